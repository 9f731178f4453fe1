"""flexai: pool, slice and schedule accelerators of any vendor."""

__version__ = "0.1.0"
