"""Benchmarks against peer libraries, and what this machine can do (`qkvlab bench`, `benchmarks/peers.py`)."""
