"""Embedded TFDS builders (shapes.py) and one-off preparation commands (build.py, convert.py)."""
