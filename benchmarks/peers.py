"""Other tools' optimizers (peers), each run in a virtual environment of its own: baselines for the benchmarks.

The peers pin onnx, onnxruntime and numpy versions that would break onnxforge's environment, so each is installed
under ~/.cache/onnxforge-peers/<name>/ on first use (`peer_venv`) and run there as a subprocess: a driver script of
benchmarks/peer_drivers/ (one per tool) reads the model, the feeds (one stacked `.npz` per set, written with
`onnxforge.data.save_samples`) and writes the tool's model. Each mode function returns an `OrtQuantized` like
onnxruntime's own tools (ort_quantization.py): the model only when onnxruntime of this environment loads it, else the
reason (an install failure, the driver's error, a timeout, a model that does not load).

    python benchmarks/peers.py --check MODEL.onnx      # every peer on MODEL with random feeds: ok or why not
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from onnxforge.data import save_samples
from ort_quantization import OrtQuantized

Feed = dict[str, np.ndarray]

PYTHON = "/root/.pyenv/versions/3.11.7/bin/python"
VENVS = Path.home() / ".cache" / "onnxforge-peers"
DRIVERS = Path(__file__).resolve().parent / "peer_drivers"
MARKER = "onnxforge-peer.json"
INSTALL_TIMEOUT_S = 3600
RUN_TIMEOUT_S = 1200

PEERS: dict[str, str] = {
    "onnxsim": (
        "onnxsim 0.8.1 (onnx-simplifier): simplify, then int8 dynamic, static QDQ, full-graph static QDQ, or its "
        "budgeted search"
    ),
    "onnxslim": "onnxslim 0.1.98: graph simplification (constant folding, dead code, fusions) in fp32",
    "nncf": "NNCF 3.4.0 (Intel): int8 QDQ post-training quantization, plain or with accuracy control",
    "inc": (
        "Intel Neural Compressor for ONNX (onnx-neural-compressor 1.0; neural-compressor 3.x has no ONNX path): int8 "
        "dynamic, static QOperator, or its accuracy-driven autotune"
    ),
    "olive": "Microsoft Olive 0.13.0, CPU: `olive auto-opt` (int8 dynamic), or a workflow with OnnxStaticQuantization",
    "quark": "AMD Quark 0.13, ONNX quantizer: int8 QDQ with its A8W8 configuration, Percentile calibration, CPU",
}
# What pip installs into each peer's environment: the tool and what its ONNX path needs, all pinned.
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "onnxsim": ("onnxsim==0.8.1", "onnx==1.23.2", "onnxruntime==1.32.0", "numpy==2.4.6"),
    "onnxslim": ("onnxslim==0.1.98", "onnx==1.23.2", "onnxruntime==1.32.0", "numpy==2.4.6"),
    "nncf": ("nncf==3.4.0", "onnx==1.23.2", "onnxruntime==1.32.0", "numpy==2.4.6"),
    # onnx-neural-compressor 1.0 (July 2024) with the onnx and onnxruntime of its time: under onnxruntime 1.32 its
    # autotune fails to load some of its own candidates ("Attempt to replace the existing tensor"). It imports
    # prettytable and scipy without declaring them.
    "inc": (
        "onnx-neural-compressor==1.0", "onnx==1.16.2", "onnxruntime==1.18.1", "numpy==1.26.4", "prettytable==3.19.0",
        "scipy==1.17.1",
    ),
    # Olive imports requests without declaring it; its OnnxPeepholeOptimizer pass asks for onnxoptimizer.
    "olive": (
        "olive-ai[cpu]==0.13.0", "torch==2.13.0", "onnx==1.23.2", "onnxruntime==1.32.0", "numpy==2.4.6",
        "requests==2.34.2", "onnxoptimizer==0.4.2",
    ),
    # Quark asks for onnx<=1.22 and onnxruntime<=1.28 (which reads models up to IR version 13), and needs torch even
    # for ONNX models: it compiles its custom onnxruntime operators with torch's C++ extension tools on first use.
    "quark": ("amd-quark==0.13", "torch==2.13.0", "onnx==1.22.0", "onnxruntime==1.28.0", "numpy==2.4.6"),
}


def peer_venv(name: str) -> Path:
    """The peer's virtual environment, created and installed on the first call (minutes) and reused after.

    An install that fails is not raised: its reason is recorded beside the environment (`install_failure` reads it),
    and later calls return at once. Changing the peer's `REQUIREMENTS` reinstalls it.
    """
    venv = VENVS / name
    marker = venv / MARKER
    if marker.exists() and json.loads(marker.read_text())["requirements"] == list(REQUIREMENTS[name]):
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    env = {**_clean_env(), "PIP_FIND_LINKS": "/opt/wheels"}  # torch's CPU wheel lies there
    steps = [[PYTHON, "-m", "venv", str(venv)], [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input"]]
    steps[1] += REQUIREMENTS[name]
    log = venv.parent / f"{name}.install.log"
    log.unlink(missing_ok=True)
    failure = None
    for step in steps:
        failure = _run(step, env, INSTALL_TIMEOUT_S, log)
        if failure:
            failure = f"install of {name} failed ({log}): {failure}"
            break
    venv.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"requirements": list(REQUIREMENTS[name]), "failure": failure}))
    return venv


def install_failure(name: str) -> str | None:
    """Why the peer's environment could not be installed, or None when it is ready (installing it if needed)."""
    return json.loads((peer_venv(name) / MARKER).read_text())["failure"]


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point a peer's Python at ours."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(command: list[str], env: dict[str, str], timeout: float, log: Path, cwd: Path | None = None) -> str | None:
    """Run `command`, its output appended to `log` as it comes; None when it succeeded, else the tail of its output.

    It runs in a session of its own, so that a timeout ends its children too.
    """
    with open(log, "ab") as file:
        file.write(f"$ {shlex.join(command)}\n".encode())
        file.flush()
        start = file.tell()
        process = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"timed out after {timeout:.0f} s (its output: {log})"
    if code == 0:
        return None
    with open(log, "rb") as file:
        file.seek(start)
        return _tail(file.read().decode(errors="replace"), code)


def _tail(output: str, code: int) -> str:
    """The last lines of a failed command's output, as one line: the error is at the end."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    tail = " | ".join(lines[-6:])
    return f"exit {code}: {tail[-600:]}"


def onnxsim_dynamic(model_path: str | Path, out_path: str | Path) -> OrtQuantized:
    """onnxsim's simplification, then its int8 dynamic quantization of MatMul and Gemm."""
    return run_peer("onnxsim", "dynamic", model_path, out_path)


def onnxsim_static(model_path: str | Path, out_path: str | Path, calibration: Sequence[Feed]) -> OrtQuantized:
    """onnxsim's simplification, then its int8 static QDQ quantization (MinMax ranges over `calibration`)."""
    return run_peer("onnxsim", "static", model_path, out_path, {"calibration": calibration})


def onnxsim_full_graph(model_path: str | Path, out_path: str | Path, calibration: Sequence[Feed]) -> OrtQuantized:
    """onnxsim's simplification, then its full-graph int8 QDQ (every float activation, MinMax over `calibration`)."""
    return run_peer("onnxsim", "full-graph", model_path, out_path, {"calibration": calibration})


def onnxsim_auto(
    model_path: str | Path,
    out_path: str | Path,
    calibration: Sequence[Feed],
    max_relative_l2: float = 0.02,
    timeout: float = RUN_TIMEOUT_S,
) -> OrtQuantized:
    """onnxsim's simplification, then `recommend_quantization`: its most compressed scheme whose worst relative L2
    error over `calibration` stays under `max_relative_l2` (its default budget), else the least lossy one that shrinks
    the model (onnxsim's `quantize_auto` returns that too, with a warning; the driver's log says which)."""
    options = ["--max-drop", str(max_relative_l2)]
    return run_peer("onnxsim", "auto", model_path, out_path, {"calibration": calibration}, options, timeout)


def onnxslim_slim(model_path: str | Path, out_path: str | Path) -> OrtQuantized:
    """onnxslim's graph simplification, in fp32."""
    return run_peer("onnxslim", "slim", model_path, out_path)


def nncf_static(
    model_path: str | Path, out_path: str | Path, calibration: Sequence[Feed], transformer: bool = False
) -> OrtQuantized:
    """`nncf.quantize` with its defaults over all of `calibration` (int8 QDQ); `transformer` passes
    `model_type=ModelType.TRANSFORMER`, as NNCF asks for transformers."""
    options = ["--transformer"] if transformer else []
    return run_peer("nncf", "static", model_path, out_path, {"calibration": calibration}, options)


def nncf_accuracy_control(
    model_path: str | Path,
    out_path: str | Path,
    calibration: Sequence[Feed],
    held_out: Sequence[Feed],
    max_drop: float = 0.01,
    transformer: bool = False,
    timeout: float = RUN_TIMEOUT_S,
) -> OrtQuantized:
    """`nncf.quantize_with_accuracy_control`: `nncf_static`, then layers back to fp32 until the worst cosine of the
    first output against fp32's over `held_out` drops by at most `max_drop` (absolute; NNCF's default 0.01). It reverts
    one layer per round and validates again, without limit by default: on a transformer it may take longer than the
    default `timeout`."""
    options = ["--max-drop", str(max_drop)] + (["--transformer"] if transformer else [])
    feeds = {"calibration": calibration, "held_out": held_out}
    return run_peer("nncf", "accuracy", model_path, out_path, feeds, options, timeout)


def inc_dynamic(model_path: str | Path, out_path: str | Path) -> OrtQuantized:
    """Intel Neural Compressor's `DynamicQuantConfig()` at its defaults."""
    return run_peer("inc", "dynamic", model_path, out_path)


def inc_static(model_path: str | Path, out_path: str | Path, calibration: Sequence[Feed]) -> OrtQuantized:
    """Intel Neural Compressor's `StaticQuantConfig` at its defaults (QOperator, per-tensor, MinMax) over
    `calibration`."""
    return run_peer("inc", "static", model_path, out_path, {"calibration": calibration})


def inc_tune(
    model_path: str | Path,
    out_path: str | Path,
    calibration: Sequence[Feed],
    held_out: Sequence[Feed],
    max_drop: float = 0.01,
    timeout: float = RUN_TIMEOUT_S,
) -> OrtQuantized:
    """Intel Neural Compressor's `autotune` over its static-quantization search space: the first configuration whose
    worst cosine of the first output against fp32's over `held_out` is at least 1 - `max_drop` (its default 0.01)."""
    feeds = {"calibration": calibration, "held_out": held_out}
    return run_peer("inc", "tune", model_path, out_path, feeds, ["--max-drop", str(max_drop)], timeout)


def olive_auto(model_path: str | Path, out_path: str | Path) -> OrtQuantized:
    """`olive auto-opt --precision int8 --device cpu`: its peephole and transformer optimizations, then int8 dynamic
    quantization (needs no data)."""
    return run_peer("olive", "auto", model_path, out_path)


def olive_static(model_path: str | Path, out_path: str | Path, calibration: Sequence[Feed]) -> OrtQuantized:
    """An Olive workflow: OnnxPeepholeOptimizer, then OnnxStaticQuantization at its defaults (QDQ, int8, MinMax over
    `calibration`)."""
    return run_peer("olive", "static", model_path, out_path, {"calibration": calibration})


def quark_static(model_path: str | Path, out_path: str | Path, calibration: Sequence[Feed]) -> OrtQuantized:
    """Quark's `ModelQuantizer` with its A8W8 configuration (int8 QDQ, symmetric, per-tensor) over `calibration`."""
    return run_peer("quark", "static", model_path, out_path, {"calibration": calibration})


def run_peer(
    name: str,
    mode: str,
    model_path: str | Path,
    out_path: str | Path,
    feeds: dict[str, Sequence[Feed]] | None = None,
    options: Sequence[str] = (),
    timeout: float = RUN_TIMEOUT_S,
) -> OrtQuantized:
    """Run the peer's driver (peer_drivers/<name>_driver.py) in its environment: `mode` on the model, writing
    `out_path`; `feeds` (set name -> feeds) are passed as --<set> FILE.npz, then `options`.

    The driver's output goes to `out_path` with `.log` appended. The seconds count the tool's run, not the install.
    """
    import onnxruntime

    model_path, out_path = Path(model_path).resolve(), Path(out_path).resolve()
    out_path.unlink(missing_ok=True)
    failure = install_failure(name)
    if failure:
        return _result(None, failure, 0.0)
    log = out_path.with_name(out_path.name + ".log")
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"onnxforge-{name}-") as work:
        command = [str(peer_venv(name) / "bin" / "python"), str(DRIVERS / f"{name}_driver.py")]
        command += [mode, str(model_path), str(out_path)]
        for set_name, samples in (feeds or {}).items():
            # One stacked .npz; a folder of one .npz per feed where their shapes differ (recordings).
            stackable = len({tuple((k, np.shape(v)) for k, v in sorted(feed.items())) for feed in samples}) <= 1
            path = Path(work) / (f"{set_name}.npz" if stackable else set_name)
            save_samples(path, samples, layout="stacked" if stackable else "folder")
            command += [f"--{set_name.replace('_', '-')}", str(path)]
        command += options
        start = time.perf_counter()
        failure = _run(command, _clean_env(), timeout, log, cwd=Path(work))  # tools drop caches in their folder
        seconds = round(time.perf_counter() - start, 3)
    if failure:
        return _result(None, f"{name} {mode}: {failure}", seconds)
    if not out_path.exists():
        return _result(None, f"{name} {mode} wrote no model", seconds)
    try:  # what a peer writes must run in this environment's onnxruntime
        onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is the result to report
        text = " ".join(str(exc).split())[:300]
        return _result(None, f"{name} {mode} wrote a model onnxruntime cannot load: {text}", seconds)
    return _result(out_path, None, seconds)


def _result(model_path: Path | None, failure: str | None, seconds: float) -> OrtQuantized:
    """A peer's outcome as onnxruntime's tools report theirs; `pre_processed` (onnxruntime's `quant_pre_process`) is
    False: each peer prepares the model its own way."""
    return OrtQuantized(model_path, failure, seconds, pre_processed=False)


def check(model_path: Path, work: Path, names: Sequence[str] = tuple(PEERS)) -> None:
    """Run every mode of the named peers on `model_path` with 8 random calibration feeds and 8 other held-out ones;
    print one line per mode: ok with its seconds and file size, or why it failed."""
    import onnx
    import onnxruntime

    from onnxforge.data import random_inputs

    onnxruntime.set_default_logger_severity(3)  # a peer's model may keep unused initializers: one warning each
    model = onnx.load(model_path, load_external_data=False)
    calibration = [random_inputs(model, seed=seed) for seed in range(8)]
    held_out = [random_inputs(model, seed=seed) for seed in range(8, 16)]
    work.mkdir(parents=True, exist_ok=True)
    for (name, mode), make in peer_modes(calibration, held_out).items():
        if name not in names:
            continue
        out = work / f"{model_path.stem}.{name}-{mode}.onnx"
        result = make(model_path, out)
        if result.model_path is None:
            print(f"{name} {mode}: FAILED after {result.seconds} s: {result.failure}", flush=True)
        else:
            size = f"{out.stat().st_size / 1e6:.2f} MB, {_quantization_nodes(out)} quantization nodes"
            print(f"{name} {mode}: ok, {result.seconds} s, {size}", flush=True)


def _quantization_nodes(path: Path) -> int:
    """How many nodes of a model (de)quantize or compute in integers: 0 when a tool left the model float."""
    import onnx

    pattern = re.compile(r"^Q[A-Z]|[Qq]uantize|Integer|NBits")
    return sum(1 for node in onnx.load(path, load_external_data=False).graph.node if pattern.search(node.op_type))


def peer_modes(
    calibration: Sequence[Feed],
    held_out: Sequence[Feed],
    transformer: bool = False,
    search_timeout: float = RUN_TIMEOUT_S,
) -> dict[tuple[str, str], Callable]:
    """Every mode of every peer at its defaults, given the feeds: (peer, mode) -> (model_path, out_path) -> result.
    `transformer`: tell NNCF the model is one; `search_timeout`: the time the modes that search (onnxsim auto, NNCF
    accuracy control, INC tune) may take."""
    return {
        ("onnxsim", "dynamic"): onnxsim_dynamic,
        ("onnxsim", "static"): lambda model, out: onnxsim_static(model, out, calibration),
        ("onnxsim", "full-graph"): lambda model, out: onnxsim_full_graph(model, out, calibration),
        ("onnxsim", "auto"): lambda model, out: onnxsim_auto(model, out, calibration, timeout=search_timeout),
        ("onnxslim", "slim"): onnxslim_slim,
        ("nncf", "static"): lambda model, out: nncf_static(model, out, calibration, transformer),
        ("nncf", "accuracy"): lambda model, out: nncf_accuracy_control(
            model, out, calibration, held_out, transformer=transformer, timeout=search_timeout
        ),
        ("inc", "dynamic"): inc_dynamic,
        ("inc", "static"): lambda model, out: inc_static(model, out, calibration),
        ("inc", "tune"): lambda model, out: inc_tune(model, out, calibration, held_out, timeout=search_timeout),
        ("olive", "auto"): olive_auto,
        ("olive", "static"): lambda model, out: olive_static(model, out, calibration),
        ("quark", "static"): lambda model, out: quark_static(model, out, calibration),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, required=True, metavar="MODEL.onnx", help="smoke-run every peer on it")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "onnxforge-peers")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peer names (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.peers.split(",")) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}")
    check(args.check, args.work, args.peers.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
