"""distill:mode=blocks: one block at a time, each towards the teacher's value where it ends, then every weight
towards the outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import onnx
import pytest
from graph_checks import constant, held_out_cosine, make_model, value_info

from onnxforge import optimize
from onnxforge.ir.io import load_model

pytest.importorskip("torch")

from onnxforge.distill.correspondence import blocks  # noqa: E402
from onnxforge.distill.torch_graph import TorchGraph  # noqa: E402

PRUNE = "prune:ratio=0.5:measure=false:recover=true"


def _residual_mlp(seed: int = 0, width: int = 32, hidden: int = 96, depth: int = 3) -> onnx.ModelProto:
    """x[N, width] -> depth x (n = LayerNorm(n + Relu(n @ wa + ba) @ wb)) -> n @ wo -> y[N, 10]: pruning keeps
    the residual sums h0, h1, ... and their normalizations n0, n1, ... as they were, so both models compute them."""
    rng = np.random.default_rng(seed)
    nodes, initializers, x = [], [], "x"
    for i in range(depth):
        initializers += [
            constant(f"wa{i}", (rng.standard_normal((width, hidden)) * 1.5 / np.sqrt(width)).astype(np.float32)),
            constant(f"ba{i}", (rng.standard_normal(hidden) * 0.1).astype(np.float32)),
            constant(f"wb{i}", (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32)),
        ]
        nodes += [
            onnx.helper.make_node("MatMul", [x, f"wa{i}"], [f"u{i}"], name=f"up{i}"),
            onnx.helper.make_node("Add", [f"u{i}", f"ba{i}"], [f"v{i}"], name=f"bias{i}"),
            onnx.helper.make_node("Relu", [f"v{i}"], [f"r{i}"], name=f"relu{i}"),
            onnx.helper.make_node("MatMul", [f"r{i}", f"wb{i}"], [f"d{i}"], name=f"down{i}"),
            onnx.helper.make_node("Add", [x, f"d{i}"], [f"h{i}"], name=f"residual{i}"),
            onnx.helper.make_node("LayerNormalization", [f"h{i}", f"g{i}", f"s{i}"], [f"n{i}"], name=f"norm{i}"),
        ]
        initializers += [
            constant(f"g{i}", (1 + 0.1 * rng.standard_normal(width)).astype(np.float32)),
            constant(f"s{i}", (0.1 * rng.standard_normal(width)).astype(np.float32)),
        ]
        x = f"n{i}"
    initializers.append(constant("wo", (rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32)))
    nodes.append(onnx.helper.make_node("MatMul", [x, "wo"], ["y"], name="head"))
    return make_model(nodes, [value_info("x", ["n", width])], [value_info("y", ["n", 10])], initializers)


def _samples(count: int = 32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(count)]


def test_blocks_end_at_the_normalized_residual_sums_and_hold_their_branch_weights():
    source = _residual_mlp()
    pruned, _ = optimize(source, PRUNE, data=_samples(), budget="none", seed=0)
    found = blocks(load_model(source), pruned, TorchGraph(pruned).initializer_parameters())
    assert [block.end for block in found] == ["n0", "n1", "n2"]
    for index, block in enumerate(found):  # the pruned branch's weights, whatever prune renamed them to
        names = sorted(name.split("_")[0] for name in block.initializers)
        assert names == [f"ba{index}", f"g{index}", f"s{index}", f"wa{index}", f"wb{index}"]
    assert blocks(load_model(source), pruned, TorchGraph(pruned).initializer_parameters(), limit=2)[-1].end == "n2"


def test_block_wise_distillation_lowers_held_out_error_and_keeps_the_graph():
    source, samples = _residual_mlp(), _samples()
    recovered, _ = optimize(source, PRUNE, data=samples, budget="none", seed=0)
    distilled, report = optimize(
        source, f"{PRUNE},distill:steps=400:batch=4:lr=1e-2:mode=blocks", data=samples, budget="none", seed=0
    )
    distill = report.passes[-1]
    assert distill.status == "applied", distill.notes
    assert "3 blocks one at a time" in distill.notes[0]
    assert distill.stats["held_out_error_after"] < distill.stats["held_out_error_before"]
    assert held_out_cosine(source, distilled, samples) > held_out_cosine(source, recovered, samples)
    before, after = recovered.to_proto().graph, distilled.to_proto().graph
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in after.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in before.node
    ]


def test_a_block_that_computes_what_the_teacher_does_is_skipped():
    from onnxforge.distill.correspondence import with_outputs
    from onnxforge.distill.training import Schedule, distill

    source, samples = _residual_mlp(), _samples()
    pruned, _ = optimize(source, f"{PRUNE}:exclude=up0", data=samples, budget="none", seed=0)  # branch 0 kept whole
    found = blocks(load_model(source), pruned, TorchGraph(pruned).initializer_parameters())
    teacher = ort.InferenceSession(with_outputs(load_model(source), [b.end for b in found]).to_proto().SerializeToString())
    names = [o.name for o in teacher.get_outputs()]
    lines: list[str] = []
    distill(
        pruned, lambda s: dict(zip(names, teacher.run(None, dict(s)))), dict, samples[:24], samples[24:],
        Schedule(steps=40, batch=2, lr=1e-2), lines.append, blocks=found,
    )  # fmt: skip
    # the unpruned branch makes two blocks (its layers' outputs correspond too), both exact
    assert lines[1:3] == ["block 1/4: already as the teacher's: skipped", "block 2/4: already as the teacher's: skipped"]
    assert any(line.startswith("block 3/4: step") for line in lines)
