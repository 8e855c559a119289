"""TVM on an NVIDIA GPU that has no TVM: compile here, measure there, against PyTorch on the same GPU.

Here (TVM and nvcc installed, no GPU needed):

    python benchmarks/tvm_gpu.py pack build/gpu-bundle [--arch sm_90] --ffi-wheel PATH [--models M ...]
        [--variants V ...]

packs a runtime-only TVM (the installed package without its compiler), the apache-tvm-ffi wheel for the GPU
machine's Python, and for each model (the residual CNN and the transformer encoder of torch_models.py, the
encoder also at batch 32) and variant (fp32 or onnxforge's `fp16` pass, each with and without CUDA graphs) the
CUDA artifact, plus per model its inputs and onnxruntime's outputs on them. On the GPU machine (CUDA, PyTorch;
no TVM, no network):

    python benchmarks/tvm_gpu.py measure build/gpu-bundle --out results.json [--torch-models M ...]

installs the runtime into the bundle, runs each artifact, compares its outputs with onnxruntime's, and times
it (TVM's time evaluator), then times the same PyTorch module (of the models in --torch-models; default all)
in float32 and float16: eager, torch.compile, and torch.compile in modes reduce-overhead (CUDA graphs) and
max-autotune. Float32 is strict (TF32 off, as TVM computes). The results file is rewritten after each model, so
a run stopped at its time limit keeps what it measured. The measuring side imports neither onnxforge nor onnx.
A bundle must stay under the GPU machine's 64 MiB per call: each artifact embeds its weights (the encoder's
fp32 ones are 19 MB), so pack the models and variants in several bundles when all do not fit.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = {"cnn": 1, "encoder": 1, "encoder32": 32}  # name: batch
VARIANTS = {"fp32": (False, False), "fp32-graph": (False, True), "fp16": (True, False), "fp16-graph": (True, True)}
TORCH_MODES = {"eager": None, "compile": "default", "compile reduce-overhead": "reduce-overhead",
               "compile max-autotune": "max-autotune"}
REPEATS = 200
BUNDLE_LIMIT_MIB = 60  # what travels to the GPU machine per call (64 MiB) less the repository itself


def pack(bundle: Path, arch: str, ffi_wheel: Path, models: list[str], variants: list[str]) -> None:
    """Write the bundle: runtime-only TVM, the ffi wheel, the loader, per model its inputs and onnxruntime's
    outputs, per model and variant the artifact, and `manifest.json` listing them (and the models packed into
    the bundle before)."""
    import tvm

    from onnxforge import optimize
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
    tvm_backend, ort = get_backend("tvm"), get_backend("ort")
    for name in models:
        model = _onnx_model(name, torch_models)
        inputs = random_inputs(skeleton_proto(model), seed=0)
        np.savez(bundle / f"{name}_inputs.npz", **inputs)
        np.savez(bundle / f"{name}_expected.npz", **ort.prepare(model).run(inputs))
        half = optimize(model, "fp16", seed=0)[0] if any(VARIANTS[v][0] for v in variants) else None
        for variant in variants:
            fp16, graph = VARIANTS[variant]
            options = BackendOptions(target=f"cuda:{arch}", extra={"cuda_graph": str(graph).lower()})
            tvm_backend.compile(half if fp16 else model, options).export(bundle / f"{name}_{variant}_cuda.so")
            print(f"packed {name} {variant}", flush=True)
    listed = bundle / "manifest.json"  # a bundle packed again keeps the models packed before
    manifest = json.loads(listed.read_text()) if listed.exists() else {"models": {}}
    if manifest.get("arch", arch) != arch:
        raise SystemExit(f"{bundle} holds models for {manifest['arch']}; pack {arch} into another bundle")
    manifest["arch"] = arch
    manifest["models"].update({name: {"batch": MODELS[name], "variants": variants} for name in models})
    listed.write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()) / 2**20
    print(f"bundle {bundle}: {size:.1f} MiB")
    if size > BUNDLE_LIMIT_MIB:
        print(f"warning: over {BUNDLE_LIMIT_MIB} MiB, too large for one GPU-machine call; pack fewer models or "
              "variants per bundle", file=sys.stderr)


def _onnx_model(name: str, torch_models):
    """The ONNX export of a benchmark model at its batch size."""
    import torch

    from onnxforge.frontends.torch import from_torch

    if name == "cnn":
        return torch_models.residual_cnn()
    example = torch.randn(MODELS[name], 128, 256)
    return from_torch(torch_models.transformer_encoder_module(), example, input_names=["x"], output_names=["y"])


def measure(bundle: Path, out: Path, torch_models_to_time: list[str] | None, torch_modes: list[str]) -> None:
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

    manifest = json.loads((bundle / "manifest.json").read_text())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "repeats": REPEATS,
               "date": datetime.date.today().isoformat(), "models": {}}
    for name, packed in manifest["models"].items():
        inputs = dict(np.load(bundle / f"{name}_inputs.npz"))
        expected = dict(np.load(bundle / f"{name}_expected.npz"))
        entry = results["models"][name] = {"batch": packed["batch"], "tvm": {}, "torch": {}}
        for variant in packed["variants"]:
            vm, device, meta = loader.load(bundle / f"{name}_{variant}_cuda.so")
            args = loader.arguments(device, meta, inputs)
            loader.run(vm, meta, args)  # the first run captures the CUDA graph, if the artifact has one
            tvm_ms = np.asarray(loader.time_runs(vm, device, args, REPEATS, warmup=20)) * 1e3
            outputs = loader.run(vm, meta, args)  # checked after the timed runs: a graph's replay
            entry["tvm"][variant] = {"cuda_graph": meta.get("cuda_graph", False),
                                     "max_rel_vs_onnxruntime": _max_rel(outputs, expected), **_stats(tvm_ms)}
            print(name, "tvm", variant, json.dumps(entry["tvm"][variant]), flush=True)
            _write(out, results)
        if torch_models_to_time is not None and name not in torch_models_to_time:
            continue
        output_name = next(iter(expected))
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            feed = [torch.from_numpy(inputs[i]).cuda().to(dtype) for i in inputs]
            for label in torch_modes:
                mode = TORCH_MODES[label]
                torch._dynamo.reset()
                net = _torch_module(name, torch_models).cuda().to(dtype)
                runner = net if mode is None else torch.compile(net, mode=mode)
                with torch.no_grad():
                    runner(*feed)
                    times = _time_torch(runner, feed)
                    result = runner(*feed).float().cpu().numpy()
                entry["torch"][f"{label} {precision}"] = {
                    "max_rel_vs_onnxruntime": _max_rel({output_name: result}, expected), **_stats(times)}
                print(name, "torch", label, precision, json.dumps(entry["torch"][f"{label} {precision}"]),
                      flush=True)
                _write(out, results)


def _torch_module(name: str, torch_models):
    """The PyTorch module of a benchmark model, in eval mode."""
    return torch_models.residual_cnn_module() if name == "cnn" else torch_models.transformer_encoder_module()


def _write(out: Path, results: dict) -> None:
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
    packing.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="default: all")
    packing.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: all")
    measuring = commands.add_parser("measure", help="on the GPU machine: run, check and time the bundle")
    measuring.add_argument("bundle", type=Path)
    measuring.add_argument("--out", type=Path, required=True, help="write the results to this JSON file")
    measuring.add_argument("--torch-models", nargs="*", choices=MODELS,
                           help="time PyTorch on these models only (default: every model of the bundle)")
    measuring.add_argument("--torch-modes", nargs="+", choices=TORCH_MODES, default=list(TORCH_MODES),
                           help="time PyTorch in these modes only (default: all; max-autotune of the CNN's "
                                "convolutions takes minutes)")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.bundle, args.arch, args.ffi_wheel, args.models, args.variants)
    else:
        measure(args.bundle, args.out, args.torch_models, args.torch_modes)


if __name__ == "__main__":
    main()
