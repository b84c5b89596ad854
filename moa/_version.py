"""The version of moa (its own module, so that code inside moa reads it without importing
the package face, moa/__init__.py, which imports everything)."""

__version__ = "0.1.0"
