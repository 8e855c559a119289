"""TVM's aarch64 target: the exported library is an AArch64 ELF, and run under qemu user-mode emulation by the
loader with the aarch64 TVM runtime alone, it gives the outputs of the same model compiled for this machine's CPU.

The emulation root (Debian's arm64 Python with aarch64 numpy and TVM runtime wheels) is built by
`scripts/aarch64_root.sh ROOT`; the tests look for it at $ONNXFORGE_AARCH64_ROOT, by default
~/.cache/onnxforge/aarch64-root. Timings under emulation say nothing about ARM hardware, so none are taken.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_checks import constant, make_model, value_info
from onnx import helper

from onnxforge.backends import BackendOptions, get_backend
from onnxforge.data import random_inputs
from onnxforge.ir import load_model
from onnxforge.ir.shapes import skeleton_proto

pytest.importorskip("tvm")

from onnxforge.backends.tvm import loader  # noqa: E402  (imports tvm)
from onnxforge.backends.tvm.targets import AARCH64_COMPILER  # noqa: E402

QEMU = "qemu-aarch64-static"
ROOT = Path(os.environ.get("ONNXFORGE_AARCH64_ROOT", "~/.cache/onnxforge/aarch64-root")).expanduser()
EM_AARCH64 = 183  # the ELF header's e_machine for AArch64
# NEON and x86 (AVX2/AVX-512) kernels sum in different orders and widths: float32 rounding only, relative to each
# output's largest magnitude.
RTOL = 1e-5

needs_cross_compiler = pytest.mark.skipif(
    shutil.which(AARCH64_COMPILER) is None,
    reason=f"exporting for aarch64 needs the cross compiler {AARCH64_COMPILER} (Debian: gcc-aarch64-linux-gnu)",
)


def _conv_relu() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("MatMul", ["f", "m"], ["mm"]),
            helper.make_node("Add", ["mm", "a"], ["y"]),
        ],
        [value_info("x", [1, 3, 8, 8])],
        [value_info("y", [1, 10])],
        [
            constant("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
            constant("b", rng.standard_normal(4).astype(np.float32)),
            constant("m", rng.standard_normal((4 * 8 * 8, 10)).astype(np.float32)),
            constant("a", rng.standard_normal(10).astype(np.float32)),
        ],
    )


def _cnn() -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    from model_builders import ResidualCNN

    from onnxforge.frontends.torch import from_torch

    torch.manual_seed(0)
    return from_torch(ResidualCNN().eval(), torch.randn(1, 3, 16, 16)).to_proto()


def _export_for_aarch64(proto: onnx.ModelProto, folder: Path) -> Path:
    library = folder / "model.so"
    get_backend("tvm").compile(proto, BackendOptions(target="aarch64")).export(library)
    return library


def _emulation_root_or_skip() -> Path:
    build = f"build it with scripts/aarch64_root.sh {ROOT} (or point ONNXFORGE_AARCH64_ROOT at one)"
    if shutil.which(QEMU) is None:
        pytest.skip(f"needs {QEMU} (Debian: qemu-user-static) and an aarch64 emulation root: {build}")
    if not (ROOT / "usr/bin/python3.11").is_file() or not (ROOT / "site/tvm").is_dir():
        pytest.skip(f"no aarch64 emulation root at {ROOT}: {build}")
    return ROOT


@needs_cross_compiler
def test_aarch64_artifact_is_an_aarch64_elf(tmp_path):
    library = _export_for_aarch64(_conv_relu(), tmp_path)
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert header[4] == 2 and header[5] == 1  # 64-bit, little-endian
    assert struct.unpack_from("<H", header, 18)[0] == EM_AARCH64
    assert json.loads(loader.metadata_path(library).read_text())["machine"] == "aarch64"


@needs_cross_compiler
@pytest.mark.parametrize("build", [_conv_relu, _cnn], ids=["conv-matmul", "residual-cnn"])
def test_aarch64_artifact_under_qemu_matches_x86(tmp_path, build):
    root = _emulation_root_or_skip()
    proto = build()
    inputs = random_inputs(skeleton_proto(load_model(proto)), seed=0)
    np.savez(tmp_path / "in.npz", **inputs)
    library = _export_for_aarch64(proto, tmp_path)
    shutil.copy(loader.__file__, tmp_path / "loader.py")  # as on a board: the loader beside the artifact, no onnxforge
    env = {**os.environ, "PYTHONPATH": str(root / "site")}
    env.pop("PYTHONHOME", None)
    command = [QEMU, "-L", str(root), str(root / "usr/bin/python3.11"), "-s", "loader.py", library.name,
               "--inputs", "in.npz", "--outputs", "out.npz"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(tmp_path / "out.npz") as saved:
        actual = dict(saved)

    expected = get_backend("tvm").prepare(proto, BackendOptions(target="cpu")).run(inputs)
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert actual[name].shape == value.shape and actual[name].dtype == value.dtype, name
        scale = max(float(np.abs(value).max()), 1e-6)
        assert float(np.abs(actual[name] - value).max()) / scale < RTOL, name
