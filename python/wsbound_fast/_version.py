"""The package version (one place; the wheel metadata reads pyproject.toml)."""

__version__ = "0.1.0"
