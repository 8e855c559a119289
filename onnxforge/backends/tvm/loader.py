"""Run an exported onnxforge TVM model with the TVM runtime alone: no compiler, no onnxforge, no onnx.

An artifact is `NAME.so` (the compiled model) and `NAME.json` (its inputs, outputs and target). This file is
self-contained on purpose: copy it next to the artifact on the machine that runs it (a GPU server, an ARM
board) and run

    python loader.py NAME.so [--inputs in.npz] [--outputs out.npz] [--repeat 100] [--json stats.json]

Without --inputs it feeds seeded random inputs of the recorded shapes. With --repeat it times the model with
TVM's time evaluator (after warm-up runs) and prints the median, 90th percentile and fastest run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

ARTIFACT_FORMAT = "onnxforge-tvm-artifact/1"


def metadata_path(library: str | Path) -> Path:
    """The JSON file that describes the library at `library`."""
    return Path(library).with_suffix(".json")


def load(library: str | Path) -> tuple[VirtualMachine, tvm.runtime.Device, dict]:
    """Load an artifact on the device it was built for; returns the VM, the device and the metadata."""
    meta = json.loads(metadata_path(library).read_text())
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{metadata_path(library)} is not an onnxforge TVM artifact description")
    if meta["device"] == "cuda":
        enable_cuda_runtime()
        device = tvm.cuda(0)
        if not device.exist:
            raise RuntimeError("this artifact runs on a CUDA GPU, and TVM finds none here")
    else:
        device = tvm.cpu(0)
    return VirtualMachine(tvm.runtime.load_module(str(library)), device), device, meta


def arguments(device: tvm.runtime.Device, meta: dict, inputs: dict[str, np.ndarray]) -> list:
    """The inputs in the model's order, on `device`; KeyError naming a missing one."""
    missing = [i["name"] for i in meta["inputs"] if i["name"] not in inputs]
    if missing:
        raise KeyError(f"inputs missing: {', '.join(missing)}")
    return [tvm.runtime.tensor(np.ascontiguousarray(inputs[i["name"]]), device) for i in meta["inputs"]]


def run(vm: VirtualMachine, meta: dict, args: list) -> dict[str, np.ndarray]:
    """Run the model once; outputs by name."""
    result = vm["main"](*args)
    outputs = list(result) if isinstance(result, (list, tuple, tvm.ir.Array)) else [result]
    return {name: value.numpy() for name, value in zip(meta["outputs"], outputs)}


def time_runs(vm: VirtualMachine, device: tvm.runtime.Device, args: list, repeat: int, warmup: int = 5) -> list[float]:
    """Seconds of `repeat` single runs, after `warmup` untimed ones, timed by TVM's time evaluator."""
    for _ in range(warmup):
        vm["main"](*args)
    return list(vm.time_evaluator("main", device, number=1, repeat=repeat)(*args).results)


def random_inputs(meta: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the recorded shapes: normal floats, small non-negative integers, booleans."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in meta["inputs"]:
        dtype, shape = np.dtype(spec["dtype"]), spec["shape"]
        if dtype.kind == "f":
            inputs[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            inputs[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
        else:
            inputs[spec["name"]] = rng.integers(0, 8, shape).astype(dtype)
    return inputs


def enable_cuda_runtime() -> None:
    """Make a runtime-only TVM (no libtvm_compiler.so) able to load CUDA modules.

    Its CUDA device and module loader live in libraries it does not load by itself; and compiling the kept
    CUDA source at load time asks `Target.current()`, which runtime-only TVM lacks: None makes NVRTC use the
    GPU's own architecture.
    """
    lib = Path(tvm.__file__).parent / "lib"
    if (lib / "libtvm_compiler.so").exists():
        return
    for name in ("libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"):
        ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
    target = getattr(tvm, "target", None)
    if target is not None and hasattr(target, "Target"):
        target.Target.current = staticmethod(lambda allow_none=True: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run an onnxforge TVM artifact with the TVM runtime only")
    parser.add_argument("library", help="the artifact's .so (its .json lies beside it)")
    parser.add_argument("--inputs", help=".npz of inputs by name (default: seeded random inputs)")
    parser.add_argument("--outputs", help="write the outputs by name to this .npz")
    parser.add_argument("--repeat", type=int, default=0, help="time this many runs (default: no timing)")
    parser.add_argument("--json", help="write the timing statistics to this JSON file")
    args = parser.parse_args(argv)
    try:
        vm, device, meta = load(args.library)
        inputs = dict(np.load(args.inputs)) if args.inputs else random_inputs(meta)
        feed = arguments(device, meta, inputs)
        outputs = run(vm, meta, feed)
        if args.outputs:
            np.savez(args.outputs, **outputs)
        for name, value in outputs.items():
            print(f"{name}: {value.dtype}{list(value.shape)}")
        if args.repeat > 0:
            times_ms = np.asarray(time_runs(vm, device, feed, args.repeat)) * 1e3
            stats = {
                "median_ms": float(np.median(times_ms)),
                "p90_ms": float(np.percentile(times_ms, 90)),
                "min_ms": float(times_ms.min()),
                "repeats": len(times_ms),
                "device": str(device),
                "target": meta["target"],
            }
            print(f"median {stats['median_ms']:.4f} ms  p90 {stats['p90_ms']:.4f} ms  min {stats['min_ms']:.4f} ms"
                  f"  ({len(times_ms)} runs on {device})")
            if args.json:
                Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
    except Exception as exc:  # TVM raises its own error types; the user gets one line either way
        lines = str(exc).strip().splitlines()
        print(f"error: {lines[-1] if lines else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
