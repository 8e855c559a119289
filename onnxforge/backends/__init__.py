"""Backends by name: `get_backend("ort")` returns the onnxruntime backend."""

from __future__ import annotations

import importlib

from onnxforge.backends.base import Backend, BackendOptions, Prepared
from onnxforge.errors import BackendError

# name -> "module:class"; imported on first use so one backend's runtime need not be installed for another.
_BACKENDS: dict[str, str] = {
    "ort": "onnxforge.backends.onnxruntime:OrtBackend",
    "onnxruntime": "onnxforge.backends.onnxruntime:OrtBackend",
    "tvm": "onnxforge.backends.tvm:TvmBackend",
}


def backend_names() -> list[str]:
    """Return the names `get_backend` accepts, sorted."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """Return a fresh backend by name; BackendError listing the known names when there is none."""
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    module_name, class_name = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BackendError(f"backend {name!r} needs a package that is not installed: {exc}") from exc
    return getattr(module, class_name)()


__all__ = ["Backend", "BackendOptions", "Prepared", "backend_names", "get_backend"]
