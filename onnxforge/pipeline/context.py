"""The per-run state passes share: the analysis cache, sample data, the backend and target, recorded decisions."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxforge.backends.base import BackendCapabilities, BackendOptions, Prepared
from onnxforge.feeds import Feeds
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import InterleavedTiming, RelativeLatency, interleaved_latency
from onnxforge.pipeline.decisions import Decision, Decisions, Measured

if TYPE_CHECKING:
    from onnxforge.pipeline.base import Analysis, Pass


class PassContext:
    """Per-run state shared by passes: the analysis cache, sample data, and the backend and target to run on.

    Passes that run or time models (calibration, measured choices) do it through `prepare` and
    `time_models`, so that no pass imports a backend, on inputs from `feed` (or `data`, the real samples): the
    run's one `Feeds` decides them, so --data, --shape and dims found by running the model apply to every pass.
    A choice made by timing goes through `decide`, which records it, or replays it from `decisions` given from
    an earlier run.
    """

    def __init__(
        self,
        data: list[dict] | None = None,
        backend: str = "ort",
        target: str = "cpu",
        threads: int | None = None,
        timing: InterleavedTiming | None = None,
        decisions: Decisions | None = None,
        feeds: Feeds | None = None,
    ):
        self.data = data
        self.feeds = feeds if feeds is not None else Feeds(samples=data)
        self.backend = backend
        self.target = target
        self.threads = threads
        self.timing = timing or InterleavedTiming()
        self.decisions = decisions or Decisions()
        self._cache: dict[type[Analysis], tuple[int, Any]] = {}
        self._pass_position = ""

    def begin_pass(self, index: int, pass_: Pass) -> None:
        """Note which pass runs now (its position in the pipeline and description): it keys its decisions."""
        self._pass_position = f"{index}:{pass_.describe()}"

    def decide(self, what: str, measure: Callable[[], Measured], allowed: Collection[Any] | None = None) -> Decision:
        """The running pass's decision on `what`: measured by `measure` and recorded, or replayed without
        measuring from the decisions given to the run (DecisionsError if they lack it, or if it is not one of
        `allowed`)."""
        return self.decisions.decide(self._pass_position + "/" + what, measure, allowed)

    def replayed_decisions(self) -> int:
        """How many of the running pass's decisions so far were replayed rather than measured."""
        prefix = self._pass_position + "/"
        return sum(d.replayed for key, d in self.decisions.made.items() if key.startswith(prefix))

    @property
    def capabilities(self) -> BackendCapabilities:
        """What this run's backend can run (contrib ops, static shapes): passes ask this, never the name."""
        from onnxforge.backends import get_backend

        return get_backend(self.backend).capabilities

    def prepare(self, model: Model | bytes, graph_optimization: str = "all") -> Prepared:
        """Load or compile `model` on this run's backend and target, ready to run or time."""
        from onnxforge.backends import get_backend

        options = BackendOptions(target=self.target, threads=self.threads, graph_optimization=graph_optimization)
        return get_backend(self.backend).prepare(model, options)

    def feed(self, model: Model) -> dict[str, np.ndarray]:
        """The inputs to run or time `model` on once: the first --data sample, else random inputs of the shapes
        the run decided (--shape, or dims found by running the model on this context's backend)."""
        return self.feeds.first(skeleton_proto(model), lambda: self.prepare(model).run)

    def time_models(self, prepared: Sequence[Prepared], inputs: Mapping[str, np.ndarray]) -> list[RelativeLatency]:
        """Time prepared models against each other in interleaved blocks; speedups are relative to the first."""
        feed = dict(inputs)
        return interleaved_latency([lambda p=p: p.run(feed) for p in prepared], self.timing)

    def analysis(self, kind: type[Analysis], model: Model) -> Any:
        """Return `kind` computed on `model`, from the cache when still valid."""
        cached = self._cache.get(kind)
        if cached is not None and cached[0] == id(model.graph):
            return cached[1]
        value = kind.compute(model)
        self._cache[kind] = (id(model.graph), value)
        return value

    def invalidate(self, preserved: tuple[type[Analysis], ...] = ()) -> None:
        """Forget every cached analysis except the preserved ones."""
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}
