"""The package's version, as installed (pyproject.toml is the one place it is written)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flap-deploy")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
