"""Sampling parameters (params.py: their one definition) and their per-sequence device state."""
