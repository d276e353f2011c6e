"""Voxtral's audio encoder + projector as Core ML packages for the Apple Neural Engine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("voxtral-coreml")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
