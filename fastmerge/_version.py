"""The package version: one place, read by the build (pyproject.toml) and by ``fastmerge.__version__``."""

__version__ = "0.1.0"
