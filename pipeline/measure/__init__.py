"""Measurements: lesion instances, size, type, location and the exact lesion <-> canal distance."""
