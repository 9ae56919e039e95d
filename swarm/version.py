"""The version that servers announce and clients log."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarm-llm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
