"""The installed distribution's version ("unknown" for a source tree on sys.path)."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("fbnet_jax")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "unknown"
