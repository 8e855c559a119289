"""Backends by name: `get_backend("ort")` returns the onnxruntime backend."""

from __future__ import annotations

import importlib

from onnxforge.backends.base import (
    Backend,
    BackendCapabilities,
    BackendOptions,
    Prepared,
)
from onnxforge.errors import BackendError

# name -> "module:class"; imported on first use so one backend's runtime need not be installed for another.
_BACKENDS: dict[str, str] = {
    "ort": "onnxforge.backends.onnxruntime:OrtBackend",
    "tvm": "onnxforge.backends.tvm:TvmBackend",
}
_ALIASES: dict[str, str] = {"onnxruntime": "ort"}
# One object per backend, shared by every name of it: an alias cannot behave differently from the name.
_LOADED: dict[str, Backend] = {}


def backend_names() -> list[str]:
    """Return the names `get_backend` accepts (aliases included), sorted."""
    return sorted([*_BACKENDS, *_ALIASES])


def get_backend(name: str) -> Backend:
    """Return the backend of a name or alias (the same object for every name of it); BackendError listing the
    known names when there is none, or when its runtime is not installed."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    if canonical not in _LOADED:
        module_name, class_name = _BACKENDS[canonical].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise BackendError(f"backend {name!r} needs a package that is not installed: {exc}") from exc
        _LOADED[canonical] = getattr(module, class_name)()
    return _LOADED[canonical]


__all__ = ["Backend", "BackendCapabilities", "BackendOptions", "Prepared", "backend_names", "get_backend"]
