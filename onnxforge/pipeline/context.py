"""The per-run state passes share: the analysis cache, sample data, the backend and target, recorded decisions."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxforge.backends.base import BackendCapabilities, BackendOptions, Prepared
from onnxforge.calibration.context import Calibration
from onnxforge.feeds import Feeds
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import InterleavedTiming, RelativeLatency, interleaved_latency
from onnxforge.pipeline.decisions import Decision, Decisions, Measured

if TYPE_CHECKING:
    import onnx

    from onnxforge.backends.reference import OperatorSchema
    from onnxforge.pipeline.base import Analysis, Pass


class PassContext:
    """Per-run state shared by passes: the analysis cache, the calibration samples, the backend and target to run on.

    Passes that run or time models (measured choices) do it through `prepare` and `time_models`, so that no pass
    imports a backend, on inputs from `feed`: the run's one `Feeds` decides them, so --data, --shape and dims
    found by running the model apply to every pass. Data-aware passes reach the --data samples through
    `calibration` alone (onnxforge.calibration.context.Calibration: the samples, their one split into calibration
    and held-out parts, running models on them, statistics cached until `invalidate`).
    A choice made by timing goes through `decide`, which records it, or replays it from `decisions` given from
    an earlier run. What must not depend on the backend (the values constant folding stores, the schemas of
    contrib ops) comes from the reference runtime, onnxruntime on the CPU: `evaluate`, `operator_schema`.
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
        self.calibration = Calibration(data, lambda model, optimization: self.prepare(model, optimization).run)
        self.feeds = feeds if feeds is not None else Feeds(samples=data)
        self.backend = backend
        self.target = target
        self.threads = threads
        self.timing = timing or InterleavedTiming()
        self.decisions = decisions or Decisions()
        self._cache: dict[type[Analysis], tuple[int, Any]] = {}
        self._pass_position = ""

    def begin_pass(self, position: str, pass_: Pass) -> None:
        """Note which pass runs now (its position in the pipeline, "3", or inside a composite pass, "3.1.2", and
        its description): it keys its decisions."""
        self._pass_position = f"{position}:{pass_.describe()}"

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

    def evaluate(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The tensor outputs of `model`, a graph without inputs, computed exactly by the reference runtime
        (onnxruntime's CPU kernels, the model as written) whatever this run's backend; BackendError if it cannot."""
        from onnxforge.backends.reference import evaluate

        return evaluate(model)

    def operator_schema(self, op: str, domain: str, opset: int) -> OperatorSchema | None:
        """The reference runtime's schema of `op` in `domain` at `opset` (com.microsoft's contrib ops, which onnx
        does not define), the same whatever this run's backend; None if it has none."""
        from onnxforge.backends.reference import operator_schema

        return operator_schema(op, domain, opset)

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
        """Forget every cached analysis except the preserved ones, and every statistic of the calibration samples."""
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}
        self.calibration.invalidate()
