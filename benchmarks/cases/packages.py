"""Installed pip packages the trained cases take their models from: where they are and which version."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(import_name: str) -> Path:
    """The folder of an installed package, found without importing it (rapidocr's main module needs OpenCV)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {import_name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(distribution: str) -> str:
    """The installed version of a distribution, or "(not installed)"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"
