"""What a running pass may ask for: cached analyses, the calibration samples, the runtime, recorded decisions."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from onnxforge.calibration.context import Calibration
from onnxforge.feeds import Feeds
from onnxforge.ir import Model
from onnxforge.measure import InterleavedTiming
from onnxforge.pipeline.decisions import Decision, Decisions, Measured
from onnxforge.pipeline.runtime import Runtime

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from onnxforge.pipeline.base import Analysis, Pass
    from onnxforge.pipeline.budget import PassBudget


class PassContext:
    """What a running pass may ask for, in three parts and its decisions:

    - `analysis(kind, model)`: facts about the model computed once and cached until a pass changes it;
    - `calibration` (onnxforge.calibration.context.Calibration): the --data samples, their one split into
      calibration and held-out parts, running models on them, statistics cached until `invalidate`;
    - `runtime` (Runtime): the run's backend and target, what they can run, preparing, feeding and timing models,
      and the reference runtime, so that no pass imports a backend;
    - `decide(what, measure)`: a choice made by timing, recorded, or replayed from an earlier run's record;
    - `budget`: while a lossy pass runs, its share of the run's error budget (budget.PassBudget), or None;
    - `teacher`: the model before the pipeline's first lossy pass, kept for a pass that wins accuracy back;
    - `progress(line)`: a line on how a long pass is getting on, for the run's instruments to show.
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
        self.runtime = Runtime(backend, target, threads, timing, feeds if feeds is not None else Feeds(samples=data))
        self.calibration = Calibration(
            data, lambda model, optimization: self.runtime.prepare(model, optimization).run, self.progress
        )
        self.decisions = decisions or Decisions()
        self._cache: dict[type[Analysis], tuple[gs.Graph, Any]] = {}
        self.budget: PassBudget | None = None
        self.teacher: Model | None = None
        self.on_progress: Callable[[str], None] = lambda line: None  # set by the pass manager
        self._pass_position = ""

    def progress(self, line: str) -> None:
        """Tell the run's instruments how the running pass is getting on (a step of a long loop, its loss)."""
        self.on_progress(line)

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

    def analysis(self, kind: type[Analysis], model: Model) -> Any:
        """Return `kind` computed on `model`, from the cache when still valid."""
        cached = self._cache.get(kind)
        # The cache holds the graph itself, not its id: a graph freed since (a rolled-back copy) could lend its id
        # to a new one.
        if cached is not None and cached[0] is model.graph:
            return cached[1]
        value = kind.compute(model)
        self._cache[kind] = (model.graph, value)
        return value

    def invalidate(self, preserved: tuple[type[Analysis], ...] = ()) -> None:
        """Forget every cached analysis except the preserved ones, and every statistic of the calibration samples."""
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}
        self.calibration.invalidate()
