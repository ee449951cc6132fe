"""The package version, in a module of its own so that modules the package imports can read it
without importing ``robcomp`` itself (pyproject.toml holds the same number for the build)."""
__version__ = "0.1.0"
