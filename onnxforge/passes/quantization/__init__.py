"""Quantization passes: int8 and int4 weights (and activations where it pays), fp16 and bf16 conversion.

Every module in this package is imported here, so a new quantization pass needs only its own module.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
