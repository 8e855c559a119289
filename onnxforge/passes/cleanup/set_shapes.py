"""`set-shapes`: fix a model's dynamic input dims to given sizes, and make the graph's shapes static with them.

Backends that compile for static shapes only (TVM) need it; on any backend it lets shape computations fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral

from onnxforge.errors import DataError, PassError, PassUsageError
from onnxforge.ir import Model, infer_shapes
from onnxforge.pipeline.base import Pass, PassResult
from onnxforge.pipeline.context import PassContext
from onnxforge.pipeline.registry import register_pass

Shapes = Mapping[str, Sequence[int]]


@register_pass("set-shapes")
class SetShapes(Pass):
    """Fix dynamic input dims to the given sizes (set-shapes:x=1x3x224x224) and make every shape static."""

    lossless = True

    @dataclass
    class Options:
        shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __init__(self, options: SetShapes.Options | None = None, /, **shapes: str | Sequence[int]):
        """Take the shapes as options named after the inputs (`x="1x3x224x224"` or `x=(1, 3, 224, 224)`), or
        an Options object; PassError for none at all or one that is not a list of sizes."""
        if options is None:
            options = self.Options({name: parse_dims(value, name) for name, value in shapes.items()})
        elif shapes:
            raise TypeError("give either an options object or the shapes, not both")
        if not options.shapes:
            raise PassError("set-shapes needs the shapes to fix: write set-shapes:NAME=1x3x224x224 (one per input)")
        super().__init__(options)

    def describe(self) -> str:
        fixed = [f"{name}={'x'.join(map(str, dims))}" for name, dims in self.options.shapes.items()]
        return ":".join([self.name, *fixed])

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        try:
            fixed = fix_input_shapes(model, self.options.shapes)
        except DataError as exc:  # no rollback makes these shapes fit: stop the run
            raise PassUsageError(f"set-shapes: {exc}") from None
        if not fixed:
            return PassResult(False, notes=["the inputs have these shapes already"])
        inference = infer_shapes(model)
        notes = [f"input {name} fixed to {_show(dims)}" for name, dims in fixed.items()]
        if not inference.ok:
            notes.append(f"shape inference stopped at a node it cannot infer: {inference.message}")
        dynamic = [t.name for g in model.graphs() for t in g.tensors().values() if _dynamic(getattr(t, "shape", []))]
        stats = {"inputs_fixed": len(fixed), "tensors_still_dynamic": len(dynamic)}
        if dynamic:
            notes.append(
                f"{len(dynamic)} tensors keep a dynamic or unknown dim (sizes that depend on values, or ops shape "
                f"inference does not know), e.g. {dynamic[0]}"
            )
        return PassResult(True, stats=stats, notes=notes)


def parse_dims(value: str | Sequence[int], name: str) -> tuple[int, ...]:
    """Sizes from `1x3x224x224` (or a sequence of ints); PassError naming the input otherwise."""
    parts = [part.strip() for part in value.split("x")] if isinstance(value, str) else list(value)
    if not parts or not all(isinstance(p, Integral) and p >= 0 or isinstance(p, str) and p.isdigit() for p in parts):
        raise PassError(f"set-shapes:{name}={value}: write the sizes as {name}=1x3x224x224 (whole numbers, 0 or more)")
    return tuple(int(part) for part in parts)


def fix_input_shapes(model: Model, shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """Give the model's inputs these shapes, in place; return the inputs that changed, with their new shapes.

    A symbolic dim fixed in one input takes the same size in every input that shares its name. One DataError,
    before anything changes, for inputs the model lacks, or shapes of another rank, with a size that contradicts
    a fixed dim, or with two sizes for one symbolic dim.
    """
    inputs = {tensor.name: tensor for tensor in model.graph.inputs}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise DataError(f"the model has no input {', '.join(unknown)}; its inputs are {', '.join(inputs) or 'none'}")
    symbols: dict[str, int] = {}
    problems = []
    for name, dims in shapes.items():
        declared = inputs[name].shape
        if declared is not None and len(declared) != len(dims):
            problems.append(f"{name} has rank {len(declared)} ({_show(declared)}), not {len(dims)}")
            continue
        for axis, (want, size) in enumerate(zip(declared or [None] * len(dims), dims)):
            if isinstance(want, int) and want >= 0 and want != size:
                problems.append(f"{name} axis {axis} is fixed at {want} ({_show(declared)}), not {size}")
            elif isinstance(want, str) and want and symbols.setdefault(want, size) != size:
                problems.append(f"dim {want!r} is given both {symbols[want]} and {size}")
    if problems:
        raise DataError(f"the shapes do not fit the model: {'; '.join(problems)}")
    fixed = {}
    for name, tensor in inputs.items():
        if name in shapes:
            new = list(shapes[name])
        elif tensor.shape is not None:
            new = [symbols.get(d, d) if isinstance(d, str) else d for d in tensor.shape]
        else:
            continue
        if tensor.shape is None or new != list(tensor.shape):
            tensor.shape = new
            fixed[name] = tuple(new)
    return fixed


def _dynamic(shape: Sequence | None) -> bool:
    return shape is None or any(not isinstance(d, int) or d < 0 for d in shape)


def _show(shape: Sequence | None) -> str:
    return "x".join("?" if d is None else str(d) for d in shape) if shape is not None else "unknown rank"
