"""What a data-aware pass reaches calibration through: the run's samples, split once into calibration and held-out
parts, a way to run models on them, and the statistics computed on them so far."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from onnxforge.data import Sample
from onnxforge.feeds import Runner
from onnxforge.ir import Model

T = TypeVar("T")


class Calibration:
    """The samples given with --data (`samples`, [] without) and what passes do with them: split them once into
    calibration and held-out parts (`split`), run models on them (`runner`; observe.py, probes.py), and keep the
    statistics computed on them (statistics.py) until `invalidate`.

    The pass context builds it with a `runner(model, graph_optimization)` that loads a model on the run's backend,
    so that calibration imports no backend, and a `progress(line)` that shows how a pass gets on (`calibration
    12/64` after each sample run), and invalidates it whenever it drops its analyses: a pass that edits the model
    in place and then needs a statistic again calls `ctx.invalidate()` first.
    """

    def __init__(
        self,
        samples: Sequence[Sample] | None,
        runner: Callable[[Model, str], Runner],
        progress: Callable[[str], None] = lambda line: None,
    ):
        self.samples: list[Sample] = list(samples or [])
        self._runner = runner
        self.progress = progress
        self._entries: list[_Entry] = []

    def split(self) -> tuple[list[Sample], list[Sample]]:
        """The run's one split of the samples (`split_samples`). Passes fit, gather statistics and refit on the
        calibration part only; the held-out part judges fidelity (a pass's choices, the run's error against the
        original), so no figure of it is measured on a sample anything was fitted to."""
        return split_samples(self.samples)

    def runner(self, model: Model, graph_optimization: str = "all") -> Runner:
        """A function that runs `model` on one sample and gives its outputs by name: the model loaded once on the
        run's backend, with its graph optimizations at `graph_optimization` ("disable": as written)."""
        return self._runner(model, graph_optimization)

    def cached(
        self, model: Model, key: Hashable, of: Sequence[object], samples: Sequence[Sample], compute: Callable[[], T]
    ) -> T:
        """`compute()`, or what it gave before for the same `key`, the same objects `of` (layers, by identity) and
        the same samples (by identity) on `model` as it is now (its graph, by identity)."""
        for entry in self._entries:
            if (
                entry.graph() is model.graph
                and entry.key == key
                and _same(entry.of, of)
                and _same(entry.samples, samples)
            ):
                return entry.value
        value = compute()
        self._entries.append(_Entry(weakref.ref(model.graph, self._forget), key, tuple(of), tuple(samples), value))
        return value

    def invalidate(self) -> None:
        """Forget every statistic: the model changed."""
        self._entries = []

    def _forget(self, graph: weakref.ref) -> None:
        """Drop what was computed on a graph that no longer exists (a pass's working copy)."""
        self._entries = [entry for entry in self._entries if entry.graph is not graph]


def split_samples(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(calibration part, held-out part) of `samples`: the last quarter (at least one sample) held out; with fewer
    than 4 samples there is nothing to spare, and both parts are all the samples."""
    samples = list(samples)
    if len(samples) < 4:
        return samples, samples
    held_out = max(1, round(len(samples) / 4))
    return samples[:-held_out], samples[-held_out:]


@dataclass
class _Entry:
    graph: weakref.ref
    key: Hashable
    of: tuple[object, ...]
    samples: tuple[Sample, ...]
    value: Any


def _same(held: tuple[object, ...], given: Sequence[object]) -> bool:
    return len(held) == len(given) and all(a is b for a, b in zip(held, given))
