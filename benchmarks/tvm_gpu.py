"""TVM on an NVIDIA GPU that has no TVM: compile here, measure there, against PyTorch on the same GPU.

Here (TVM and nvcc installed, no GPU needed):

    python benchmarks/tvm_gpu.py pack build/gpu-bundle [--arch sm_90] --ffi-wheel PATH

packs a runtime-only TVM (the installed package without its compiler), the apache-tvm-ffi wheel for the GPU
machine's Python, and for each model (the residual CNN and the transformer encoder of torch_models.py) the CUDA
artifact, its inputs and onnxruntime's outputs on them. On the GPU machine (CUDA, PyTorch; no TVM, no network):

    python benchmarks/tvm_gpu.py measure build/gpu-bundle --out results.json

installs the runtime into the bundle, runs each artifact, compares its outputs with onnxruntime's, and times
it (TVM's time evaluator) and the same PyTorch module, eager and torch.compile, in strict float32 (TF32 off,
as TVM computes). The measuring side imports neither onnxforge nor onnx.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = ("cnn", "encoder")
REPEATS = 200


def pack(bundle: Path, arch: str, ffi_wheel: Path) -> None:
    """Write the bundle: runtime-only TVM, the ffi wheel, the loader and per model the artifact and its data."""
    import tvm

    from onnxforge.backends import BackendOptions, get_backend
    from onnxforge.data import random_inputs
    from onnxforge.ir.shapes import skeleton_proto

    sys.path.insert(0, str(HERE))
    import torch_models

    if not ffi_wheel.is_file():
        raise SystemExit(
            f"no ffi wheel at {ffi_wheel}; get it with: pip download --no-deps --only-binary=:all: "
            "--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 "
            "apache-tvm-ffi==0.1.14.post1 -d DIR"
        )
    bundle.mkdir(parents=True, exist_ok=True)
    package = Path(tvm.__file__).parent
    skip = {"3rdparty", "src", "include", "__pycache__", "libtvm_compiler.so"}
    with tarfile.open(bundle / "tvm-runtime.tar.xz", "w:xz") as archive:
        archive.add(package, arcname="tvm", filter=lambda info: None if Path(info.name).name in skip else info)
    shutil.copy(ffi_wheel, bundle / ffi_wheel.name)
    shutil.copy(HERE.parent / "onnxforge" / "backends" / "tvm" / "loader.py", bundle / "loader.py")
    shutil.copy(HERE / "torch_models.py", bundle / "torch_models.py")
    builders = {"cnn": torch_models.residual_cnn, "encoder": torch_models.transformer_encoder}
    tvm_backend, ort = get_backend("tvm"), get_backend("ort")
    for name in MODELS:
        model = builders[name]()
        inputs = random_inputs(skeleton_proto(model), seed=0)
        np.savez(bundle / f"{name}_inputs.npz", **inputs)
        np.savez(bundle / f"{name}_expected.npz", **ort.prepare(model).run(inputs))
        tvm_backend.compile(model, BackendOptions(target=f"cuda:{arch}")).export(bundle / f"{name}_cuda.so")
        print(f"packed {name}")
    size = sum(f.stat().st_size for f in bundle.iterdir()) / 2**20
    print(f"bundle {bundle}: {size:.1f} MiB")


def measure(bundle: Path, out: Path) -> None:
    """Run and time every artifact of the bundle and the same PyTorch modules; write the results as JSON."""
    import torch

    site = bundle / "site"
    if not (site / "tvm").is_dir():
        wheels = [str(w) for w in bundle.glob("apache_tvm_ffi-*.whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *wheels], check=True)
        with tarfile.open(bundle / "tvm-runtime.tar.xz") as archive:
            archive.extractall(site, filter="data")
    sys.path[:0] = [str(site), str(bundle)]
    loader = _import(bundle / "loader.py", "loader")
    import torch_models

    modules = {"cnn": torch_models.residual_cnn_module, "encoder": torch_models.transformer_encoder_module}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "repeats": REPEATS, "models": {}}
    for name in MODELS:
        inputs = dict(np.load(bundle / f"{name}_inputs.npz"))
        expected = dict(np.load(bundle / f"{name}_expected.npz"))
        vm, device, meta = loader.load(bundle / f"{name}_cuda.so")
        args = loader.arguments(device, meta, inputs)
        outputs = loader.run(vm, meta, args)
        tvm_ms = np.asarray(loader.time_runs(vm, device, args, REPEATS, warmup=20)) * 1e3
        net = modules[name]().cuda()
        feed = [torch.from_numpy(inputs[i["name"]]).cuda() for i in meta["inputs"]]
        with torch.no_grad():
            torch_out = net(*feed)
            eager_ms = _time_torch(net, feed)
            compiled = torch.compile(net)
            compiled_ms = _time_torch(compiled, feed)
        results["models"][name] = {
            "target": meta["target"],
            "tvm_vs_onnxruntime_max_rel": _max_rel(outputs, expected),
            "torch_vs_onnxruntime_max_rel": _max_rel({meta["outputs"][0]: torch_out.cpu().numpy()}, expected),
            "tvm_ms": _stats(tvm_ms),
            "torch_eager_ms": _stats(eager_ms),
            "torch_compile_ms": _stats(compiled_ms),
        }
        print(name, json.dumps(results["models"][name]), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def _time_torch(net, feed) -> np.ndarray:
    """Milliseconds of single runs timed with CUDA events, after warm-up."""
    import torch

    for _ in range(20):
        net(*feed)
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        net(*feed)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return np.asarray(times)


def _stats(times_ms: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(times_ms)),
        "p90": float(np.percentile(times_ms, 90)),
        "min": float(times_ms.min()),
    }


def _max_rel(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, value in actual.items():
        reference = expected[name]
        worst = max(worst, float(np.abs(value - reference).max() / max(np.abs(reference).max(), 1e-12)))
    return worst


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="here: compile for CUDA and pack the bundle")
    packing.add_argument("bundle", type=Path)
    packing.add_argument("--arch", default="sm_90", help="the GPU's architecture (default sm_90, the H100)")
    packing.add_argument("--ffi-wheel", type=Path, required=True, help="apache-tvm-ffi wheel for the GPU's Python")
    measuring = commands.add_parser("measure", help="on the GPU machine: run, check and time the bundle")
    measuring.add_argument("bundle", type=Path)
    measuring.add_argument("--out", type=Path, required=True, help="write the results to this JSON file")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.bundle, args.arch, args.ffi_wheel)
    else:
        measure(args.bundle, args.out)


if __name__ == "__main__":
    main()
