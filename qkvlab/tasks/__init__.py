"""The study's tasks (synthetic, vision, anomaly, segmentation, language) and their registry."""
