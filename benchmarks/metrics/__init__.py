"""Task metrics for onnxforge's `--budget metric=FILE.py:FUNCTION>=BOUND`, one file each (self-contained: onnxforge
loads the file by its path)."""
