"""An example onnxforge plugin package: its passes register on import (the `onnxforge.passes` entry point)."""

from onnxforge_example_plugin.strip_metadata import StripMetadata

__all__ = ["StripMetadata"]
