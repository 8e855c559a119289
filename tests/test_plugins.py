"""Pass plugins (--plugin, entry points), the pass manager's verify-and-roll-back, and pass options."""

import os
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import OnnxforgeError, PassError
from onnxforge.frontends import from_onnx
from onnxforge.ir import Model
from onnxforge.pipeline import (
    Pass,
    PassFailedError,
    PassManager,
    PassResult,
    VerifyOptions,
    create_passes,
    get_pass,
    load_plugin,
    register_pass,
)
from onnxforge.pipeline import registry
from onnxforge.pipeline.registry import available_passes, parse_pass_list
from test_cli import ONNXFORGE, OPTIMIZE, only_error_line, run_cli, succeeded

_W = np.random.default_rng(3).standard_normal((8, 3)).astype(np.float32)
_B = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def _linear_model() -> Model:
    """y = x @ W + b with x of shape (2, 8)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(_W, "W"), numpy_helper.from_array(_B, "b")],
    )
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _relu_chain_model(length: int = 3) -> onnx.ModelProto:
    """y = Relu(Relu(...Relu(x))) with x of shape (2, 8)."""
    names = ["x", *(f"r{i}" for i in range(1, length)), "y"]
    graph = helper.make_graph(
        [helper.make_node("Relu", [a], [b]) for a, b in zip(names, names[1:])],
        "relu_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run_model(model: Model | onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    if isinstance(model, Model):
        model = model.to_proto()
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _fresh_x(shape=(2, 8)) -> np.ndarray:
    return np.random.default_rng().standard_normal(shape).astype(np.float32)


def _ops(model: Model | onnx.ModelProto | Path) -> list[str]:
    if isinstance(model, Model):
        return [node.op for node in model.graph.nodes]
    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    return [node.op_type for node in proto.graph.node]


def _manager(*passes: Pass, on_error: str = "rollback", **kwargs) -> PassManager:
    return PassManager(list(passes), verify=VerifyOptions(seed=0), on_error=on_error, **kwargs)


# --- test passes, registered per test (see _test_passes_registered) ------------------------------------------


class AddBecomesSub(Pass):
    """Claim to be lossless but turn every Add into a Sub."""

    name = "test-wrong-lossless"

    def run(self, model, ctx):
        adds = [node for node in model.graph.nodes if node.op == "Add"]
        for node in adds:
            node.op = "Sub"
        return PassResult(changed=bool(adds), stats={"adds_turned_into_subs": len(adds)})


class DanglingInput(Pass):
    """Make the Add read a tensor that no node produces and no input or weight provides."""

    name = "test-dangling-input"

    def run(self, model, ctx):
        add = next(node for node in model.graph.nodes if node.op == "Add")
        add.inputs[1] = gs.Variable("made_by_nobody", dtype=np.float32, shape=[3])
        return PassResult(changed=True)


class RaisesHalfway(Pass):
    """Delete a node, then crash before finishing."""

    name = "test-raises"

    def run(self, model, ctx):
        model.graph.nodes.pop()
        raise RuntimeError("boom half-way")


class ReturnsNothing(Pass):
    """Edit the model but forget to return a PassResult."""

    name = "test-returns-nothing"

    def run(self, model, ctx):
        model.graph.nodes.pop()


class RefusesWithUserError(Pass):
    """Refuse the model with an error a user can act on."""

    name = "test-refuses"

    def run(self, model, ctx):
        raise PassError("this model has no Conv to prune")


class ScaleWeights(Pass):
    """Scale the MatMul weight by 1 + factor (lossy on purpose)."""

    name = "test-lossy-scale"
    lossless = False

    @dataclass
    class Options:
        factor: float = 0.01

    def run(self, model, ctx):
        weight = model.graph.tensors()["W"]
        weight.values = weight.values * np.float32(1 + self.options.factor)  # a new array: never in place
        return PassResult(changed=True, stats={"weights_scaled": 1})


class EveryOptionKind(Pass):
    """Do nothing; take one option of each kind the option parser converts."""

    name = "test-options"

    @dataclass
    class Options:
        ratio: float = 0.3
        method: Literal["l1", "l2", "activation"] = "l1"
        bits: Literal[4, 8] = 8
        layers: list[int] = field(default_factory=list)
        names: tuple[str, ...] = ()
        enabled: bool = True
        limit: int | None = None

    def run(self, model, ctx):
        return PassResult(changed=False)


@pytest.fixture(autouse=True)
def _test_passes_registered(monkeypatch):
    """Register this module's test passes for one test only: other test modules (which may run every
    registered lossless pass) must never see a pass that is wrong on purpose."""
    available_passes()  # built-ins and installed plugins load into the real registry first
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    for cls in (AddBecomesSub, DanglingInput, RaisesHalfway, ScaleWeights, EveryOptionKind):
        register_pass(cls.name)(cls)


# --- the pass manager: verify, roll back, stop ---------------------------------------------------------------


def test_wrong_lossless_pass_is_rolled_back_with_its_relative_error():
    model = _linear_model()

    result, [record] = _manager(AddBecomesSub()).run(model)

    assert record.name == "test-wrong-lossless"
    assert record.status == "rolled_back"
    assert "relative error" in record.error
    assert record.max_rel_error is not None and record.max_rel_error > 1e-4
    assert _ops(result) == ["MatMul", "Add"]


def test_pass_that_makes_an_invalid_graph_is_rolled_back_with_the_reason():
    result, [record] = _manager(DanglingInput()).run(_linear_model())

    assert record.status == "rolled_back"
    assert "invalid ONNX" in record.error and "made_by_nobody" in record.error
    assert [t.name for t in result.graph.nodes[1].inputs] == ["h", "b"]


def test_pass_that_raises_is_rolled_back_with_the_exception_named():
    result, [record] = _manager(RaisesHalfway()).run(_linear_model())

    assert record.status == "rolled_back"
    assert "RuntimeError" in record.error and "boom half-way" in record.error
    assert _ops(result) == ["MatMul", "Add"]  # the node it deleted before crashing is back


def test_model_after_only_failing_passes_equals_the_model_before():
    model = _linear_model()

    result, records = _manager(AddBecomesSub(), DanglingInput(), RaisesHalfway()).run(model)

    assert [r.status for r in records] == ["rolled_back"] * 3
    assert all(r.error for r in records)
    assert result.stats() == model.stats()
    assert _ops(result) == _ops(model) == ["MatMul", "Add"]
    x = _fresh_x()
    np.testing.assert_array_equal(_run_model(result, x), _run_model(model, x))
    np.testing.assert_allclose(_run_model(result, x), x @ _W + _B, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("broken", [AddBecomesSub, DanglingInput, RaisesHalfway])
def test_on_error_stop_raises_pass_failed_error_naming_the_pass(broken):
    with pytest.raises(PassFailedError, match=broken.name):
        _manager(broken(), on_error="stop").run(_linear_model())


def test_lossy_pass_that_changes_numerics_is_accepted_and_its_error_recorded():
    model = _linear_model()

    result, [record] = _manager(ScaleWeights(factor=0.02)).run(model)

    assert record.status == "applied"
    assert record.name == "test-lossy-scale:factor=0.02"
    assert 0 < record.max_rel_error < 0.05
    x = _fresh_x()
    np.testing.assert_allclose(_run_model(result, x), x @ (_W * np.float32(1.02)) + _B, rtol=1e-4, atol=1e-4)
    # The caller's model keeps its weights: the pass replaced the array in the manager's copy only.
    np.testing.assert_allclose(_run_model(model, x), x @ _W + _B, rtol=1e-5, atol=1e-5)


def test_passes_after_a_rolled_back_one_run_on_the_restored_model():
    result, records = _manager(AddBecomesSub(), ScaleWeights(factor=0.5)).run(_linear_model())

    assert [r.status for r in records] == ["rolled_back", "applied"]
    x = _fresh_x()
    np.testing.assert_allclose(_run_model(result, x), x @ (_W * np.float32(1.5)) + _B, rtol=1e-4, atol=1e-4)


def test_pass_returning_no_pass_result_is_rolled_back():
    result, [record] = _manager(ReturnsNothing()).run(_linear_model())

    assert record.status == "rolled_back"
    assert "not PassResult" in record.error
    assert _ops(result) == ["MatMul", "Add"]


def test_pass_raising_a_user_error_is_rolled_back_with_its_message():
    _, [record] = _manager(RefusesWithUserError()).run(_linear_model())

    assert record.status == "rolled_back"
    assert record.error == "this model has no Conv to prune"


def test_without_verification_a_wrong_lossless_pass_is_applied():
    manager = PassManager([AddBecomesSub()], verify=VerifyOptions(enabled=False))

    result, [record] = manager.run(_linear_model())

    assert record.status == "applied" and record.max_rel_error is None
    assert _ops(result) == ["MatMul", "Sub"]


def test_unknown_on_error_mode_is_refused():
    with pytest.raises(OnnxforgeError, match="on_error"):
        PassManager([], on_error="ignore")


def test_registering_a_taken_name_or_a_non_pass_fails():
    class Impostor(Pass):
        """Claim the built-in cleanup's name."""

    with pytest.raises(PassError, match="'cleanup' is taken"):
        register_pass("cleanup")(Impostor)
    with pytest.raises(TypeError, match="Pass subclass"):
        register_pass("test-not-a-pass")(object)
    assert available_passes()["cleanup"] is not Impostor
    with pytest.raises(PassError, match="unknown pass 'test-nope'.*cleanup"):
        get_pass("test-nope")


def test_accepted_lossy_pass_becomes_the_reference_for_the_next_lossless_check():
    result, records = _manager(ScaleWeights(factor=0.5), create_passes("cleanup")[0]).run(_linear_model())

    assert [r.status for r in records] == ["applied", "unchanged"]
    assert records[0].max_rel_error > 0.1


# --- plugins: --plugin module, .py file, entry points -------------------------------------------------------

_RELU_PLUGIN = '''
from onnxforge.ir.edit import bypass_node
from onnxforge.pipeline import Pass, PassResult, register_pass


DECORATOR
class CLASS_NAME(Pass):
    """Remove one Relu whose only consumer is another Relu (Relu is idempotent)."""

    def run(self, model, ctx):
        graph = model.graph
        for node in graph.nodes:
            if node.op != "Relu" or node.outputs[0] in graph.outputs:
                continue
            consumers = node.outputs[0].outputs
            if len(consumers) == 1 and consumers[0].op == "Relu" and bypass_node(graph, node):
                graph.cleanup()
                return PassResult(changed=True, stats={"relus_removed": 1})
        return PassResult(changed=False, stats={"relus_removed": 0})
'''


def _relu_plugin(path: Path, class_name: str, pass_name: str | None) -> Path:
    """Write a plugin module with a Relu-collapsing pass, decorated with @register_pass(pass_name) if given."""
    decorator = f'@register_pass("{pass_name}")' if pass_name else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_RELU_PLUGIN.replace("DECORATOR", decorator).replace("CLASS_NAME", class_name))
    return path


def _pythonpath(folder: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}


def _listed(result: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}


def test_plugin_module_on_pythonpath_registers_a_pass_that_the_cli_runs(tmp_path):
    site = tmp_path / "site"
    (site / "team").mkdir(parents=True)
    (site / "team" / "__init__.py").write_text("")
    _relu_plugin(site / "team" / "passes.py", "CollapseRelus", "team-collapse-relu")
    model_path = tmp_path / "relus.onnx"
    onnx.save(_relu_chain_model(3), str(model_path))
    out = tmp_path / "out.onnx"
    env = _pythonpath(site)

    listed = _listed(succeeded(run_cli(ONNXFORGE, "list-passes", "--plugin", "team.passes", env=env)))
    assert "Remove one Relu whose only consumer" in listed["team-collapse-relu"]
    succeeded(
        run_cli(OPTIMIZE, model_path, "--plugin", "team.passes", "--passes", "team-collapse-relu", "-o", out, env=env)
    )

    assert _ops(out) == ["Relu", "Relu"]
    x = _fresh_x()
    np.testing.assert_array_equal(_run_model(out, x), np.maximum(x, 0))


def test_plugin_given_as_py_file_registers_its_passes_in_process(tmp_path):
    path = _relu_plugin(tmp_path / "file_plugin.py", "FileCollapseRelus", "test-file-collapse-relu")

    load_plugin(str(path))
    load_plugin(str(path))  # loading the same file again is harmless

    pass_ = get_pass("test-file-collapse-relu")()
    result, [record] = _manager(pass_).run(from_onnx(_relu_chain_model(2)))
    assert record.status == "applied"
    assert _ops(result) == ["Relu"]


def test_plugin_that_cannot_be_loaded_is_a_pass_error(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise ImportError('needs a package you do not have')\n")

    with pytest.raises(PassError, match="needs a package you do not have"):
        load_plugin(str(broken))
    with pytest.raises(PassError, match="not found"):
        load_plugin(str(tmp_path / "missing.py"))
    with pytest.raises(PassError, match="no_such_plugin_module_xyz"):
        load_plugin("no_such_plugin_module_xyz")


def _fake_distribution(site: Path, entry_points: str) -> None:
    """Install `myplugin` 0.1 into `site` as pip would leave it: a dist-info folder beside the modules."""
    info = site / "myplugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points).lstrip())


def test_entry_points_register_a_pass_class_and_a_module_of_passes(tmp_path):
    site = tmp_path / "site"
    _relu_plugin(site / "myplugin_mod.py", "MyPass", None)
    _relu_plugin(site / "myplugin_registering.py", "ModulePass", "my-module-pass")
    _fake_distribution(
        site,
        """
        [onnxforge.passes]
        my-pass = myplugin_mod:MyPass
        my-module-passes = myplugin_registering
        """,
    )
    model_path = tmp_path / "relus.onnx"
    onnx.save(_relu_chain_model(3), str(model_path))
    out = tmp_path / "out.onnx"
    env = _pythonpath(site)

    listed = _listed(succeeded(run_cli(ONNXFORGE, "list-passes", env=env)))
    assert "Remove one Relu whose only consumer" in listed["my-pass"]
    assert "my-module-pass" in listed
    assert "cleanup" in listed
    succeeded(run_cli(OPTIMIZE, model_path, "--passes", "my-pass,my-module-pass", "-o", out, env=env))

    assert _ops(out) == ["Relu"]
    x = _fresh_x()
    np.testing.assert_array_equal(_run_model(out, x), np.maximum(x, 0))


def test_broken_entry_point_is_one_error_line_naming_the_plugin(tmp_path):
    site = tmp_path / "site"
    _fake_distribution(site, "[onnxforge.passes]\nghost-pass = myplugin_missing_module:Ghost\n")

    result = run_cli(ONNXFORGE, "list-passes", env=_pythonpath(site))

    assert "ghost-pass" in only_error_line(result)
    assert len(result.stderr.splitlines()) == 1


# --- options: parsing, conversion, describe -----------------------------------------------------------------


def test_parse_pass_list_reads_colon_separated_options_per_pass():
    assert parse_pass_list("prune:ratio=0.3:method=l1,quant:bits=4") == [
        ("prune", {"ratio": "0.3", "method": "l1"}),
        ("quant", {"bits": "4"}),
    ]


def test_parse_pass_list_continues_options_after_a_comma():
    assert parse_pass_list("prune:ratio=0.3,method=l1") == [("prune", {"ratio": "0.3", "method": "l1"})]
    assert parse_pass_list(" cleanup , prune:ratio=0.3, method=l1 ,quant ") == [
        ("cleanup", {}),
        ("prune", {"ratio": "0.3", "method": "l1"}),
        ("quant", {}),
    ]


@pytest.mark.parametrize("text", ["ratio=0.3,prune", "prune:ratio", "prune:=3"])
def test_parse_pass_list_rejects_options_without_a_pass_or_a_value(text):
    with pytest.raises(PassError):
        parse_pass_list(text)


def test_options_convert_to_the_annotated_types():
    [pass_] = create_passes("test-options:ratio=0.5:method=l2:bits=4,layers=1+2+3:names=a+b:enabled=false:limit=7")

    assert pass_.options == EveryOptionKind.Options(
        ratio=0.5, method="l2", bits=4, layers=[1, 2, 3], names=("a", "b"), enabled=False, limit=7
    )
    assert isinstance(pass_.options.bits, int)


@pytest.mark.parametrize(
    ("option", "bad", "expected"),
    [
        ("method=l3", "l3", "choose one of l1, l2, activation"),
        ("bits=5", "5", "choose one of 4, 8"),
        ("ratio=lots", "lots", "expected float"),
        ("layers=1+x", "x", "expected int"),
    ],
)
def test_option_values_that_do_not_fit_are_a_pass_error_naming_pass_option_and_choices(option, bad, expected):
    name = option.partition("=")[0]
    with pytest.raises(PassError, match=f"bad value '{bad}' for test-options:{name}") as caught:
        create_passes(f"test-options:{option}")
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True)]
    + [("false", False), ("0", False), ("no", False), ("Off", False)],
)
def test_bool_options_accept_the_usual_spellings(text, value):
    assert create_passes(f"test-options:enabled={text}")[0].options.enabled is value


def test_bool_option_rejects_other_words():
    with pytest.raises(PassError, match="expected true or false"):
        create_passes("test-options:enabled=maybe")


def test_optional_option_accepts_none_and_its_type():
    assert create_passes("test-options:limit=none")[0].options.limit is None
    assert create_passes("test-options:limit=12")[0].options.limit == 12
    with pytest.raises(PassError, match="expected int"):
        create_passes("test-options:limit=twelve")


def test_unknown_option_is_a_pass_error_listing_the_known_ones():
    with pytest.raises(PassError, match="no option 'colour'.*ratio, method"):
        create_passes("test-options:colour=red")


def test_options_given_as_python_values_are_converted_too():
    pass_ = EveryOptionKind(ratio=1, bits="4", layers=(5, 6), enabled="no")
    assert pass_.options == EveryOptionKind.Options(ratio=1.0, bits=4, layers=[5, 6], enabled=False)
    assert create_passes([("test-options", {"limit": 3})])[0].options.limit == 3


@pytest.mark.parametrize(
    "text",
    [
        "test-options",
        "test-options:ratio=0.75",
        "test-options:method=activation:bits=4:enabled=false",
        "test-options:layers=3+1+2:names=conv1+fc:limit=0",
        "test-lossy-scale:factor=0.125",
    ],
)
def test_describe_round_trips_through_the_pass_list_parser(text):
    [pass_] = create_passes(text)

    described = pass_.describe()
    [again] = create_passes(described)

    assert described == text
    assert type(again) is type(pass_) and again.options == pass_.options



def test_a_plugin_file_also_imported_as_a_module_registers_without_a_clash(tmp_path, monkeypatch):
    (tmp_path / "twice_passes.py").write_text(
        "from onnxforge.pipeline import Pass, PassResult, register_pass\n"
        "@register_pass('test-twice')\n"
        "class Twice(Pass):\n"
        "    '''Does nothing.'''\n"
        "    def run(self, model, ctx):\n"
        "        return PassResult(changed=False)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import twice_passes  # noqa: F401

    load_plugin(str(tmp_path / "twice_passes.py"))
    assert get_pass("test-twice").summary() == "Does nothing."
