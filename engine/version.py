"""The package version: the single source that pyproject.toml and the compiled module read."""

__version__ = "0.1.0"
