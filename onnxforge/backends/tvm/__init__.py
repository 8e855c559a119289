"""Apache TVM (Relax) as an onnxforge backend: compile for CPU, CUDA or AArch64, tune, export, run, measure."""

from onnxforge.backends.tvm.backend import TvmBackend, TvmPrepared

__all__ = ["TvmBackend", "TvmPrepared"]
