"""visearch: instance-level visual search."""
__version__ = "0.1.0"
