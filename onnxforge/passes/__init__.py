"""The built-in pass families (cleanup, fusion, quantization, pruning, low-rank); `onnxforge.pipeline` runs them."""
