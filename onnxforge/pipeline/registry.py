"""Where passes are found: built-ins registered by decorator, installed plugins, and user modules."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxforge.errors import PassError
from onnxforge.pipeline.base import Pass

ENTRY_POINT_GROUP = "onnxforge.passes"

_PASSES: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: make a Pass subclass available under `name` (CLI, config files, Python API)."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass('{name}') needs a Pass subclass, got {cls!r}")
        existing = _PASSES.get(name)
        if existing is not None and existing is not cls and _origin(existing) != _origin(cls):
            raise PassError(f"pass name '{name}' is taken by {_qualname(existing)}")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return decorate


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _origin(cls: type) -> tuple[str, str]:
    """Where a class is defined: the same file imported twice (as a module and by path) is one origin."""
    try:
        source = str(Path(inspect.getsourcefile(cls) or "").resolve())
    except TypeError:
        source = cls.__module__
    return (source, cls.__qualname__)


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, built-ins and installed plugins included."""
    _load_builtins()
    load_entry_points()
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; PassError listing the known names if there is none."""
    passes = available_passes()
    if name not in passes:
        raise PassError(f"unknown pass '{name}' (known: {', '.join(passes)}; see --list-passes)")
    return passes[name]


def load_entry_points() -> None:
    """Import the plugins installed under the `onnxforge.passes` entry-point group (once per process).

    An entry point may name a module (its @register_pass decorators run on import) or a Pass subclass,
    which is then registered under the entry point's name.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as exc:
            raise PassError(f"cannot load pass plugin '{entry.name}' ({entry.value}): {exc}") from None
        if isinstance(loaded, type) and issubclass(loaded, Pass) and loaded not in _PASSES.values():
            register_pass(entry.name)(loaded)


def load_plugin(spec: str) -> None:
    """Import a user's module that registers passes: a module name (`my.passes`) or a `.py` file path."""
    path = Path(spec)
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise PassError(f"plugin file '{spec}' not found")
            module_name = f"onnxforge_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except PassError:
        raise
    except Exception as exc:
        raise PassError(f"cannot load plugin '{spec}': {type(exc).__name__}: {exc}") from None


def parse_pass_list(text: str) -> list[tuple[str, dict[str, str]]]:
    """Parse `prune:ratio=0.3:method=l1,quant:bits=4` into [(name, {option: value}), ...].

    Options follow their pass after ':'; a comma-separated item holding '=' continues the previous pass's
    options, so `prune:ratio=0.3,method=l1` works too. List values are joined with '+'. A part without '='
    continues the previous value, so `quant:granularity=block:32:bits=4` gives granularity 'block:32'.
    """
    steps: list[tuple[str, dict[str, str]]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        head, *option_texts = item.split(":")
        if "=" in head:
            if not steps:
                raise PassError(f"option '{head}' comes before any pass name in '{text}'")
            option_texts = [head, *option_texts]
        else:
            steps.append((head.strip(), {}))
        key = ""
        for option in option_texts:
            if "=" not in option and key:  # a value holding ':' itself, as in granularity=block:32
                steps[-1][1][key] += f":{option.strip()}"
                continue
            key, sep, value = option.partition("=")
            key = key.strip()
            if not sep or not key:
                raise PassError(f"bad pass option '{option}' in '{item}': write key=value")
            steps[-1][1][key] = value.strip()
    return steps


def create_passes(steps: str | Sequence[str | Pass | tuple[str, dict[str, Any]]]) -> list[Pass]:
    """Instantiate passes from a pass-list string, or a list of names, `name:opt=v` strings, Pass objects
    or (name, options) pairs."""
    if isinstance(steps, str):
        steps = [steps]
    passes: list[Pass] = []
    for step in steps:
        if isinstance(step, Pass):
            passes.append(step)
        elif isinstance(step, tuple):
            name, options = step
            passes.append(get_pass(name)(**options))
        else:
            passes.extend(get_pass(name)(**options) for name, options in parse_pass_list(step))
    if not passes:
        raise PassError("no passes given (see --list-passes)")
    return passes


BUILTIN_FAMILIES = ("cleanup", "distillation", "fusion", "lowrank", "pruning", "quantization")


def _load_builtins() -> None:
    # Importing the pass families (onnxforge.passes.*) runs their @register_pass decorators.
    for family in BUILTIN_FAMILIES:
        importlib.import_module(f"onnxforge.passes.{family}")
