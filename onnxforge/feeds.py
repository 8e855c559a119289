"""The inputs a run feeds the model: `--data` samples first, then `--shape`, then dynamic dims found by running it.

Verification, calibration, measured choices and speed checks all take their inputs from one `Feeds`, so that
`--data`, `--shape` and the dims found for a model that cannot run with the defaults apply to every one of them.
`Feeds` never runs a model itself: whoever holds a backend gives it a `Runner` (the verifier, `PassContext`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxforge.data import (
    SAMPLE_RATES,
    InputSpec,
    Sample,
    check_shapes,
    default_dim,
    input_specs,
    is_batch_dim,
    is_sample_rate,
    random_inputs,
)
from onnxforge.errors import DataError
from onnxforge.limits import TimeLimitError, execution_time_limit, execution_timeout_s

# Runs the model once on a feed; raises BackendError when the model cannot run on it.
Runner = Callable[[Sample], Any]

# Values tried for the dynamic dims, after the defaults: powers of two cover divisibility by strides and pooling
# (feature maps concatenated after upsampling), the larger ones paddings and windows (an STFT), 16000 one second
# of 16 kHz audio.
SEARCH_VALUES = (16, 32, 64, 128, 256, 512, 1024, 16000)
MAX_TRIES = 48
SEARCH_SECONDS = 60.0
# A candidate whose random inputs would take more than this is skipped: the search is not worth gigabytes.
SEARCH_INPUT_LIMIT_BYTES = 256 * 2**20
_OUT_OF_RANGE = re.compile(r"out of (data )?bounds|out of range|must be within", re.IGNORECASE)


@dataclass
class _Dim:
    """A dynamic dim every input that names it shares (an unnamed dim is its own): where it is and its default."""

    key: str
    places: list[tuple[str, int]]
    default: int
    batch: bool


@dataclass
class Feeds:
    """Decides what a run feeds the model, once per run.

    `samples` (`--data`) are used as they are. Otherwise inputs are random, shaped by `shapes` (`--shape`) and,
    for the other dynamic dims, by the defaults of `data.random_inputs`; when the model cannot run on those,
    `resolve` tries other values (SEARCH_VALUES, the same for every input that names a dim alike; 16000 and 8000
    for an integer scalar input) until one runs, and keeps it for the rest of the run.
    """

    samples: list[Sample] | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    # Set by `resolve`: the shape of every input, the values of integer scalars it fixed, and how they were found.
    input_shapes: dict[str, list[int]] | None = None
    scalar_values: dict[str, int] = field(default_factory=dict)
    how: str = ""
    tries: int = 0

    def __post_init__(self) -> None:
        self.samples = [dict(sample) for sample in self.samples] if self.samples else None
        self.shapes = {name: [int(d) for d in dims] for name, dims in (self.shapes or {}).items()}

    @property
    def resolved(self) -> bool:
        return self.samples is not None or self.input_shapes is not None

    def resolve(self, model: onnx.ModelProto, run: Runner, seed: int = 0) -> None:
        """Fix the shapes of the random inputs: those the model runs with (`run` runs it) on the first that
        works of --shape and the defaults, then other values of the remaining dynamic dims. Nothing to do with
        --data samples or once resolved. DataError, naming the inputs and what to pass, when none runs."""
        if self.resolved:
            return
        specs = input_specs(model)
        check_shapes(specs, self.shapes)
        dims = _dynamic_dims(specs, self.shapes)
        first = self._shapes_of(specs, {d.key: d.default for d in dims})
        errors: list[str] = []
        if self._runs(model, first, {}, run, seed, errors):
            given = ["--shape"] if self.shapes else []
            how = " and ".join(given + (["the defaults"] if dims else [])) or "the model's fixed shapes"
            self._keep(first, {}, how, 1)
            return
        if not dims and not _integer_scalars(specs, first):
            raise self._failure(specs, dims, errors)
        start = time.monotonic()
        for values, scalars in self._candidates(specs, dims):
            if len(errors) >= MAX_TRIES or time.monotonic() - start > SEARCH_SECONDS:
                break
            shapes = self._shapes_of(specs, values)
            if _input_bytes(specs, shapes) > SEARCH_INPUT_LIMIT_BYTES:
                continue
            remaining = SEARCH_SECONDS - (time.monotonic() - start)
            try:
                ran = self._runs(model, shapes, scalars, run, seed, errors, remaining)
            except TimeLimitError as exc:
                if exc.deadline is not None:  # --timeout or --pass-timeout: not the search's to handle
                    raise
                errors.append(f"the search ran out of its {SEARCH_SECONDS:g} s")
                break
            if ran:
                changed = [f"{d.key}={values[d.key]}" for d in dims if values[d.key] != d.default]
                changed += [f"{name}={value}" for name, value in scalars.items()]
                how = f"searched: {', '.join(changed)} ran after {len(errors)} failed tries"
                self._keep(shapes, scalars, how, len(errors) + 1)
                return
        raise self._failure(specs, dims, errors)

    def random(self, model: onnx.ModelProto, seed: int) -> Sample:
        """One random feed of the resolved shapes (or --shape and the defaults when not resolved yet)."""
        return self._draw(model, self.input_shapes or self.shapes, self.scalar_values, seed)

    def inputs(self, model: onnx.ModelProto, count: int, seed: int) -> list[Sample]:
        """`count` feeds: the last --data samples, or random feeds drawn from seeds seed, seed + 1, ..."""
        if self.samples:
            return [dict(sample) for sample in self.samples[-count:]]
        return [self.random(model, seed + i) for i in range(count)]

    def first(self, model: onnx.ModelProto, runner: Callable[[], Runner]) -> Sample:
        """The feed to time or run a model on once: the first --data sample, else a random feed (seed 0) of the
        shapes the run decided, resolved if they were not yet with the runner that `runner()` makes."""
        if self.samples:
            return dict(self.samples[0])
        if not self.resolved:
            self.resolve(model, runner())
        return self.random(model, 0)

    def describe(self) -> dict[str, Any]:
        """What the report says about the inputs: where they came from, their shapes, how the shapes were found."""
        if self.samples:
            first = self.samples[0]
            return {
                "source": "--data",
                "samples": len(self.samples),
                "shapes": {name: list(np.shape(value)) for name, value in first.items()},
            }
        how = self.how or "not decided: nothing ran the model on random inputs"
        described: dict[str, Any] = {"source": "random", "shapes": self.input_shapes, "found_by": how}
        if self.shapes:
            described["given_with_shape"] = self.shapes
        if self.scalar_values:
            described["values"] = self.scalar_values
        if self.tries > 1:
            described["tries"] = self.tries
        return described

    def _keep(self, shapes: dict[str, list[int]], scalars: dict[str, int], how: str, tries: int) -> None:
        self.input_shapes, self.scalar_values, self.how, self.tries = shapes, scalars, how, tries

    def _shapes_of(self, specs: list[InputSpec], values: Mapping[str, int]) -> dict[str, list[int]]:
        shapes = {}
        for spec in specs:
            if spec.name in self.shapes:
                shapes[spec.name] = list(self.shapes[spec.name])
            elif spec.shape is not None:
                shapes[spec.name] = [
                    dim if isinstance(dim, int) else values[_key(spec.name, axis, dim)]
                    for axis, dim in enumerate(spec.shape)
                ]
        return shapes

    def _candidates(self, specs: list[InputSpec], dims: list[_Dim]):
        """Assignments to try after the defaults: every non-batch dim at each search value together, then each
        alone, then every dim, batch ones too (a length named N); with integer scalars, first as drawn, then at
        each sample rate."""
        defaults = {d.key: d.default for d in dims}
        free = [d for d in dims if not d.batch]
        assignments = [{**defaults, **{d.key: v for d in free}} for v in SEARCH_VALUES] if free else []
        if len(free) > 1:
            assignments += [{**defaults, d.key: v} for d in free for v in SEARCH_VALUES]
        if len(free) < len(dims):
            assignments += [{d.key: v for d in dims} for v in SEARCH_VALUES]
        scalars = _integer_scalars(specs, self._shapes_of(specs, defaults))
        scalar_choices: list[dict[str, int]] = [{}]
        scalar_choices += [{name: rate for name in scalars} for rate in SAMPLE_RATES]
        for scalar_values in scalar_choices:
            for values in assignments or [defaults]:
                if values == defaults and not scalar_values:
                    continue  # tried first
                yield values, scalar_values

    def _runs(
        self,
        model: onnx.ModelProto,
        shapes: dict[str, list[int]],
        scalars: dict[str, int],
        run: Runner,
        seed: int,
        errors: list[str],
        seconds: float | None = None,
    ) -> bool:
        """Whether the model runs on a random feed of `shapes`; why not goes to `errors`. A try that outlasts
        `seconds` raises TimeLimitError, as does the first (seconds=None) past the bound of one execution."""
        feed = self._draw(model, shapes, scalars, seed)
        bound = execution_timeout_s() if seconds is None else max(min(seconds, execution_timeout_s()), 1e-3)
        try:
            with execution_time_limit(bound):
                run(feed)
        except TimeLimitError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to run means "not these shapes"
            errors.append(f"{_format_feed(feed)}: {_first_line(exc)}")
            return False
        return True

    def _draw(
        self, model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], scalars: Mapping[str, int], seed: int
    ) -> Sample:
        feed = random_inputs(model, shapes=shapes, seed=seed)
        for name, value in scalars.items():
            feed[name] = np.full_like(feed[name], value)
        return feed

    def _failure(self, specs: list[InputSpec], dims: list[_Dim], errors: list[str]) -> DataError:
        """One error: which inputs could not be given shapes the model runs with, what was tried, what to pass."""
        last = errors[-1] if errors else "no try ran"
        with_open_dims = {name for d in dims for name, _ in d.places}
        named = [s for s in specs if s.name in with_open_dims] or [s for s in specs if s.name not in self.shapes]
        names = ", ".join(repr(s.name) for s in named or specs)
        example = " ".join(f"--shape {s.name}={_template(s)}" for s in named or specs)
        if dims:
            message = (
                f"the input model fails on random inputs of {names} ({len(errors)} shapes tried for dynamic dims "
                f"{', '.join(d.key for d in dims)}); last: {last}; give shapes it runs with ({example}) or real "
                "samples with --data"
            )
        else:
            message = f"the input model fails on random inputs ({last}); give real samples with --data"
        indices = [s.name for s in specs if s.dtype.kind in "iu" and not is_sample_rate(s, [1])]
        if indices and any(_OUT_OF_RANGE.search(e) for e in errors):
            message += (
                f"; it indexes out of range with the random integers of {', '.join(map(repr, indices))} "
                "(drawn in [0, 8)): such inputs need real values, give them with --data"
            )
        scalars = [s.name for s in specs if s.dtype.kind in "iu" and s.shape is not None and len(s.shape) == 0]
        if scalars:
            message += (
                f"; integer scalar input(s) {', '.join(map(repr, scalars))} were tried random and at "
                f"{' and '.join(map(str, SAMPLE_RATES))}: if one needs another value, give it with --data"
            )
        return DataError(message)


def _dynamic_dims(specs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> list[_Dim]:
    """The dynamic dims `shapes` leaves open, one per name (an unnamed dim: one per input and axis), in order."""
    bound = {
        dim
        for spec in specs
        if spec.name in shapes and spec.shape is not None
        for dim in spec.shape
        if isinstance(dim, str)
    }
    dims: dict[str, _Dim] = {}
    for spec in specs:
        if spec.name in shapes:
            continue
        if spec.shape is None:
            raise DataError(f"the model does not give the shape of input {spec.name!r}; give it with --shape")
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                continue
            if isinstance(dim, str) and dim in bound:
                continue
            key = _key(spec.name, axis, dim)
            entry = dims.setdefault(key, _Dim(key, [], default_dim(dim, axis), is_batch_dim(dim, axis)))
            entry.places.append((spec.name, axis))
    return list(dims.values())


def _key(name: str, axis: int, dim: str | int | None) -> str:
    return dim if isinstance(dim, str) else f"{name}[{axis}]"


def _integer_scalars(specs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Integer inputs of one value (a sample rate, a step count): random values rarely serve them."""
    return [
        s.name
        for s in specs
        if s.dtype.kind in "iu" and s.name in shapes and int(np.prod(shapes[s.name], dtype=np.int64)) == 1
    ]


def _input_bytes(specs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> int:
    return sum(int(np.prod(shapes.get(s.name, []), dtype=np.int64)) * s.dtype.itemsize for s in specs)


def _template(spec: InputSpec) -> str:
    if spec.shape is None:
        return "DIMS"
    return "x".join(str(d) if isinstance(d, int) else (d or "N") for d in spec.shape) if spec.shape else "(scalar)"


def _format_feed(feed: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{name}={'x'.join(map(str, np.shape(v))) or 'scalar'}" for name, v in feed.items())


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
