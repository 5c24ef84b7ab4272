"""The library version, at the bottom of the stack so every module may read it."""

__version__ = "0.1.0"
