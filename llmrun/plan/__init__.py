"""Placement planning: measured memory (devices.py), model sizes, and the pure planner."""
