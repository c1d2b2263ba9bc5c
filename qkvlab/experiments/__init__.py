"""Experiments that combine training, conversion and evaluation into one measured result
(`qkvlab experiment NAME`). Each writes a Markdown table and a JSON file with the command,
the machine and the wall time."""
