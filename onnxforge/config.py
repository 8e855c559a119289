"""Pipeline config files: the `optimize` options kept in a TOML or JSON file for build pipelines."""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from onnxforge.errors import OnnxforgeError
from onnxforge.pipeline.budget import absolute_metric_path


class ConfigError(OnnxforgeError):
    """A pipeline config file cannot be read or holds unknown or ill-typed keys."""


@dataclass
class PipelineConfig:
    """What a config file may set; every field is optional and command-line flags override it.

    Example (TOML):
        passes = ["cleanup", { name = "fold-constants", max_bytes = 4096 }]
        data = "calibration/"          # relative paths are relative to the config file
        shapes = { input_ids = [1, 128] }
        on_error = "stop"
        output = "model.opt.onnx"
    """

    passes: list[Any] | None = None
    output: str | None = None
    report: str | None = None
    data: str | None = None
    budget: str | None = None
    shapes: dict[str, list[int]] | None = None
    plugins: list[str] | None = None
    on_error: str | None = None
    verify: bool | None = None
    rtol: float | None = None
    seed: int | None = None
    measure: bool | None = None
    backend: str | None = None
    target: str | None = None
    threads: int | None = None
    external_data: str | None = None
    # Measured decisions to replay: a --report JSON (a path) or its "decisions" section (a table), so that the
    # config rebuilds the same model without timing (what optimize --auto writes for its winner).
    decisions: str | dict[str, Any] | None = None

    def optimize_kwargs(self) -> dict[str, Any]:
        """The fields `onnxforge.optimize` takes, for `optimize(model, **config.optimize_kwargs())`."""
        names = ("passes", "data", "budget", "shapes", "plugins", "on_error", "verify", "rtol", "seed", "measure")
        names += ("backend", "target", "threads", "decisions")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


_TYPES: dict[str, tuple[type, ...]] = {
    "passes": (list, str),
    "output": (str,),
    "report": (str,),
    "data": (str,),
    "budget": (str,),
    "shapes": (dict,),
    "plugins": (list,),
    "on_error": (str,),
    "verify": (bool,),
    "rtol": (float, int),
    "seed": (int,),
    "measure": (bool,),
    "backend": (str,),
    "target": (str,),
    "threads": (int,),
    "external_data": (str,),
    "decisions": (str, dict),
}
_CHOICES = {"on_error": ("rollback", "stop"), "external_data": ("auto", "yes", "no")}
_MINIMUMS = {"rtol": (0, "a finite number, 0 or more"), "threads": (1, "a whole number, 1 or more")}
_RELATIVE_PATHS = ("output", "report", "data")  # and decisions, when it is a path


def load_config(path: str | Path) -> PipelineConfig:
    """Read a `.toml` or `.json` pipeline config; ConfigError names the bad key or the parse error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a table of options")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _TYPES:
            closest = difflib.get_close_matches(name, _TYPES, n=1)
            suggestion = f": did you mean '{closest[0]}'?" if closest else ""
            known = ", ".join(sorted(_TYPES))
            raise ConfigError(f"unknown key '{key}' in config file '{path}'{suggestion} (known: {known})")
        wrong_bool = isinstance(value, bool) and bool not in _TYPES[name]  # bool is an int subclass
        if wrong_bool or not isinstance(value, _TYPES[name]):
            expected = " or ".join(t.__name__ for t in _TYPES[name])
            raise ConfigError(f"key '{key}' in config file '{path}' must be {expected}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"key '{key}' in config file '{path}' must be one of {', '.join(_CHOICES[name])}")
        if name in _MINIMUMS and not (math.isfinite(value) and value >= _MINIMUMS[name][0]):
            raise ConfigError(f"key '{key}' in config file '{path}' must be {_MINIMUMS[name][1]}, got {value}")
        values[name] = value
    base = path.parent
    for name in _RELATIVE_PATHS:
        if name in values:
            values[name] = str(base / values[name])
    if isinstance(values.get("decisions"), str):
        values["decisions"] = str(base / values["decisions"])
    if "budget" in values:
        values["budget"] = absolute_metric_path(values["budget"], base)
    if "plugins" in values:
        values["plugins"] = [str(base / p) if p.endswith(".py") else p for p in values["plugins"]]
    if isinstance(values.get("passes"), list):
        values["passes"] = [_pass_step(step, path) for step in values["passes"]]
    return PipelineConfig(**values)


def _pass_step(step: Any, path: Path) -> str | tuple[str, dict[str, Any]]:
    if isinstance(step, str):
        return step
    if isinstance(step, dict) and isinstance(step.get("name"), str):
        options = {k: v for k, v in step.items() if k != "name"}
        return (step["name"], options)
    raise ConfigError(f"each pass in config file '{path}' must be a string or a table with a 'name'")


def dump_config(config: PipelineConfig, base: str | Path = ".") -> str:
    """`config` as the text of a JSON config file that `load_config` reads back to the same config wherever the
    file is kept: relative paths are made absolute from `base` (where they were given), unset fields left out."""
    values = {name: value for name, value in asdict(config).items() if value not in (None, [], {})}
    for name in _RELATIVE_PATHS:
        if name in values:
            values[name] = str(Path(base, values[name]).resolve())
    if isinstance(values.get("decisions"), str):
        values["decisions"] = str(Path(base, values["decisions"]).resolve())
    if "budget" in values:
        values["budget"] = absolute_metric_path(values["budget"], base)
    if "plugins" in values:
        values["plugins"] = [str(Path(base, p).resolve()) if p.endswith(".py") else p for p in values["plugins"]]
    if isinstance(values.get("passes"), list):
        values["passes"] = [
            step if isinstance(step, str) else {"name": step[0], **step[1]} for step in values["passes"]
        ]
    return json.dumps(values, indent=2) + "\n"
