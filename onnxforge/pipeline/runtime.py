"""What a pass may ask of the run's backend: what it can run, loading, feeding and timing models on it, and the
reference runtime for what must not depend on it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from onnxforge.backends.base import BackendCapabilities, BackendOptions, Prepared
from onnxforge.feeds import Feeds
from onnxforge.ir import Model
from onnxforge.ir.shapes import skeleton_proto
from onnxforge.measure import InterleavedTiming, RelativeLatency, interleaved_latency

if TYPE_CHECKING:
    import onnx

    from onnxforge.backends.reference import OperatorSchema


class Runtime:
    """The run's backend (`backend`, a name for messages only) and `target`, with its `threads` and `timing`
    settings, and the run's one `Feeds` (--data, --shape, dims found by running the model). Passes ask
    `capabilities`, never the name, so that every alias of a backend gives the same model."""

    def __init__(
        self,
        backend: str = "ort",
        target: str = "cpu",
        threads: int | None = None,
        timing: InterleavedTiming | None = None,
        feeds: Feeds | None = None,
    ):
        self.backend = backend
        self.target = target
        self.threads = threads
        self.timing = timing or InterleavedTiming()
        self.feeds = feeds if feeds is not None else Feeds()

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
