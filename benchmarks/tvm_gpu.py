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
fp32 ones are 19 MB), so pack the models and variants in several bundles when all do not fit. Variants
`fp32-tuned`, `fp16-tuned` and their `-graph` forms compile with the MetaSchedule records of --records (default
benchmarks/results/tvm-records).

Tuning for the GPU, candidates built here and measured there, one device call per round (docs/tvm.md):

    python benchmarks/tvm_gpu.py tune build/gpu-tune --ffi-wheel PATH --trials N [--model encoder]
        [--half-passes fp16] [--only matmul ...] [--batch 64] [--records build/gpu-tune-records]

runs in the background here: it writes `build/gpu-tune/runtime/` once and each round's candidates to
`build/gpu-tune/round-NNN/`, then waits for `results.json` in that folder. On the GPU machine, per round:

    python benchmarks/tvm_gpu.py round build/gpu-tune/round-NNN.tar.xz --runtime build/gpu-tune/runtime --out r.json

and the results file goes back to `build/gpu-tune/round-NNN/results.json`. Then

    python benchmarks/tvm_gpu.py keep build/gpu-tune-records/cuda-<hash> [more records folders] [--best 3]

copies the best records of each task (of every folder given) into benchmarks/results/tvm-records, which the repository keeps.
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = {"cnn": 1, "encoder": 1, "encoder32": 32}  # name: batch
VARIANTS = {"fp32": (False, False), "fp32-graph": (False, True), "fp16": (True, False), "fp16-graph": (True, True),
            "fp32-tuned": (False, False), "fp32-tuned-graph": (False, True),
            "fp16-tuned": (True, False), "fp16-tuned-graph": (True, True)}  # name: (fp16, CUDA graphs)
RECORDS = HERE / "results" / "tvm-records"
TORCH_MODES = {"eager": None, "compile": "default", "compile reduce-overhead": "reduce-overhead",
               "compile max-autotune": "max-autotune"}
REPEATS = 200
BUNDLE_LIMIT_MIB = 60  # what travels to the GPU machine per call (64 MiB) less the repository itself


def pack(bundle: Path, arch: str, ffi_wheel: Path, models: list[str], variants: list[str],
         records: Path = RECORDS, half_passes: str = "fp16") -> None:
    """Write the bundle: runtime-only TVM, the ffi wheel, the loader, per model its inputs and onnxruntime's
    outputs, per model and variant the artifact, and `manifest.json` listing them (and the models packed into
    the bundle before)."""
    from onnxforge import optimize
    from onnxforge.backends import BackendOptions, get_backend
    from onnxforge.data import random_inputs
    from onnxforge.ir.shapes import skeleton_proto

    sys.path.insert(0, str(HERE))
    import torch_models

    _pack_runtime(bundle, ffi_wheel)
    shutil.copy(HERE / "torch_models.py", bundle / "torch_models.py")
    tvm_backend, ort = get_backend("tvm"), get_backend("ort")
    for name in models:
        model = _onnx_model(name, torch_models)
        inputs = random_inputs(skeleton_proto(model), seed=0)
        np.savez(bundle / f"{name}_inputs.npz", **inputs)
        np.savez(bundle / f"{name}_expected.npz", **ort.prepare(model).run(inputs))
        half = optimize(model, half_passes, seed=0)[0] if any(VARIANTS[v][0] for v in variants) else None
        for variant in variants:
            fp16, graph = VARIANTS[variant]
            extra = {"cuda_graph": str(graph).lower()}
            if "tuned" in variant:
                extra["tune_records"] = str(records)
            options = BackendOptions(target=f"cuda:{arch}", extra=extra)
            tvm_backend.compile(half if fp16 else model, options).export(bundle / f"{name}_{variant}_cuda.so")
            print(f"packed {name} {variant}", flush=True)
    listed = bundle / "manifest.json"  # a bundle packed again keeps the models packed before
    manifest = json.loads(listed.read_text()) if listed.exists() else {"models": {}}
    if manifest.get("arch", arch) != arch:
        raise SystemExit(f"{bundle} holds models for {manifest['arch']}; pack {arch} into another bundle")
    manifest["arch"] = arch
    manifest["half_passes"] = half_passes
    for name in models:  # variants packed into the bundle before stay listed
        before = manifest["models"].get(name, {}).get("variants", [])
        manifest["models"][name] = {"batch": MODELS[name], "variants": list(dict.fromkeys(before + variants))}
    listed.write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()) / 2**20
    print(f"bundle {bundle}: {size:.1f} MiB")
    if size > BUNDLE_LIMIT_MIB:
        print(f"warning: over {BUNDLE_LIMIT_MIB} MiB, too large for one GPU-machine call; pack fewer models or "
              "variants per bundle", file=sys.stderr)


def _pack_runtime(folder: Path, ffi_wheel: Path) -> None:
    """Write a runtime-only TVM (the installed package without its compiler), the ffi wheel and the scripts that
    run on the GPU machine (loader.py, measure_candidates.py) into `folder`."""
    import tvm

    if not ffi_wheel.is_file():
        raise SystemExit(
            f"no ffi wheel at {ffi_wheel}; get it with: pip download --no-deps --only-binary=:all: "
            "--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 "
            "apache-tvm-ffi==0.1.14.post1 -d DIR"
        )
    folder.mkdir(parents=True, exist_ok=True)
    package = Path(tvm.__file__).parent
    skip = {"3rdparty", "src", "include", "__pycache__", "libtvm_compiler.so"}
    with tarfile.open(folder / "tvm-runtime.tar.xz", "w:xz") as archive:
        archive.add(package, arcname="tvm", filter=lambda info: None if Path(info.name).name in skip else info)
    shutil.copy(ffi_wheel, folder / ffi_wheel.name)
    scripts = HERE.parent / "onnxforge" / "backends" / "tvm"
    for script in ("loader.py", "measure_candidates.py"):
        shutil.copy(scripts / script, folder / script)


def _install_runtime(folder: Path, site: Path) -> None:
    """Install the runtime-only TVM and the ffi wheel of `folder` into `site` (once)."""
    if (site / "tvm").is_dir():
        return
    wheels = [str(w) for w in folder.glob("apache_tvm_ffi-*.whl")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    str(site), *wheels], check=True)
    with tarfile.open(folder / "tvm-runtime.tar.xz") as archive:
        archive.extractall(site, filter="data")


def tune(bundle: Path, arch: str, ffi_wheel: Path, trials: int, only: list[str], records: Path, batch: int,
         model_name: str = "encoder", half_passes: str | None = None) -> None:
    """Tune a benchmark model (in float32, or after the passes `half_passes`, such as "fp16") for `cuda:arch`
    into `records`, each round of candidates measured on the GPU machine through `bundle` (see the module's
    docstring)."""
    import tvm

    from onnxforge import optimize
    from onnxforge.backends.tvm.backend import relax_module
    from onnxforge.backends.tvm.targets import resolve_target
    from onnxforge.backends.tvm.tuning import TuningOptions, compile_tuned

    sys.path.insert(0, str(HERE))
    import torch_models

    _pack_runtime(bundle / "runtime", ffi_wheel)
    model = _onnx_model(model_name, torch_models)
    module = relax_module((optimize(model, half_passes, seed=0)[0] if half_passes else model).to_proto())
    options = TuningOptions(trials, records, rounds=bundle, only=tuple(only), batch=batch)
    target = resolve_target(f"cuda:{arch}").target
    compile_tuned(module, target, options, lambda line: print(line, flush=True))
    print(f"records: {options.records_folder(target)} (tvm {tvm.__version__})", flush=True)


def keep_records(tuned: list[Path], kept: Path, best: int) -> None:
    """Copy the `best` fastest records of each task from the records folders `tuned` (each a target's
    `cuda-<hash>/`, of one target: tuning runs of several models) into a folder of the same name under `kept`:
    the small database the repository keeps."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from onnxforge.backends.tvm.tuning import load_tensor_intrinsics, records_use_tensor_cores

    names = {folder.name for folder in tuned}
    if len(names) != 1:
        raise SystemExit(f"the records folders are of different targets: {', '.join(sorted(names))}")
    if any(records_use_tensor_cores(folder) for folder in tuned):
        load_tensor_intrinsics(("cuda",))  # before reading records that name them
    (kept / tuned[0].name).mkdir(parents=True, exist_ok=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        (kept / tuned[0].name / name).unlink(missing_ok=True)
    target = ms.database.JSONDatabase(work_dir=str(kept / tuned[0].name), module_equality="structural")
    workloads = 0
    for folder in tuned:
        source = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
        found = {}
        for record in source.get_all_tuning_records():
            found.setdefault(tvm_ffi.structural_hash(record.workload.mod), record.workload)
        for workload in found.values():
            committed = target.commit_workload(workload.mod)
            for record in source.get_top_k(workload, best):
                target.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, committed, record.run_secs, record.target, record.args_info))
        workloads += len(found)
    print(f"kept the best {best} records of {workloads} tasks in {kept / tuned[0].name}")


def measure_round(folder: Path, runtime: Path, out: Path) -> None:
    """On the GPU machine: install the runtime of `runtime` and measure the round of candidates in `folder` (or
    in the archive `round-NNN.tar.xz`)."""
    import os

    site = Path("/tmp/onnxforge-tvm-site")
    _install_runtime(runtime, site)
    if folder.name.endswith(".tar.xz"):
        with tarfile.open(folder) as archive:
            archive.extractall(site.parent / "onnxforge-rounds", filter="data")
        folder = site.parent / "onnxforge-rounds" / folder.name.removesuffix(".tar.xz")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(runtime / "measure_candidates.py"), str(folder), "--out", str(out)],
                   env=environment, check=True)


def _onnx_model(name: str, torch_models):
    """The ONNX export of a benchmark model at its batch size."""
    import torch

    from onnxforge.frontends.torch import from_torch

    if name == "cnn":
        return torch_models.residual_cnn()
    example = torch.randn(MODELS[name], 128, 256)
    return from_torch(torch_models.transformer_encoder_module(), example, input_names=["x"], output_names=["y"])


def measure(bundle: Path, out: Path, torch_models_to_time: list[str] | None, torch_modes: list[str],
            torch_precisions: Sequence[str] = ("fp32", "fp16")) -> None:
    """Run and time every artifact of the bundle and the same PyTorch modules (in `torch_modes`, at
    `torch_precisions`); write the results as JSON."""
    import torch

    site = bundle / "site"
    _install_runtime(bundle, site)
    sys.path[:0] = [str(site), str(bundle)]
    loader = _import(bundle / "loader.py", "loader")
    import torch_models

    manifest = json.loads((bundle / "manifest.json").read_text())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "repeats": REPEATS,
               "date": datetime.date.today().isoformat(), "half_passes": manifest.get("half_passes", "fp16"),
               "models": {}}
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
        for precision in torch_precisions:
            dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
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
    measuring.add_argument("--torch-precisions", nargs="+", choices=("fp32", "fp16"), default=["fp32", "fp16"],
                           help="time PyTorch at these precisions only (default: both)")
    packing.add_argument("--records", type=Path, default=RECORDS, help="tuning records of the -tuned variants")
    packing.add_argument("--half-passes", default="fp16",
                         help="the passes of the fp16 variants (default fp16; fp16:convert=Softmax+"
                              "LayerNormalization computes those in half precision too)")
    tuning = commands.add_parser("tune", help="here: tune a model, each round measured on the GPU machine")
    tuning.add_argument("bundle", type=Path, help="folder of the runtime and the rounds")
    tuning.add_argument("--arch", default="sm_90")
    tuning.add_argument("--ffi-wheel", type=Path, required=True)
    tuning.add_argument("--trials", type=int, required=True, help="trial budget, shared by the tasks tuned")
    tuning.add_argument("--only", nargs="*", default=[], help="tune only the tasks whose name contains one of these")
    tuning.add_argument("--records", type=Path, default=RECORDS)
    tuning.add_argument("--batch", type=int, default=64, help="candidates of each task per round (default 64)")
    tuning.add_argument("--model", choices=MODELS, default="encoder", help="default: the encoder at batch 1")
    tuning.add_argument("--half-passes", help="tune the model after these passes (fp16, as pack's fp16 variants)")
    keeping = commands.add_parser("keep", help="here: copy the best records of each task into the repository's")
    keeping.add_argument("tuned", type=Path, nargs="+",
                         help="a target's records folders (cuda-<hash>) written by tune, of one model or several")
    keeping.add_argument("--records", type=Path, default=RECORDS)
    keeping.add_argument("--best", type=int, default=3)
    measuring_round = commands.add_parser("round", help="on the GPU machine: measure one round of candidates")
    measuring_round.add_argument("folder", type=Path)
    measuring_round.add_argument("--runtime", type=Path, required=True, help="the tune bundle's runtime folder")
    measuring_round.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.bundle, args.arch, args.ffi_wheel, args.models, args.variants, args.records, args.half_passes)
    elif args.command == "tune":
        tune(args.bundle, args.arch, args.ffi_wheel, args.trials, args.only, args.records, args.batch, args.model,
             args.half_passes)
    elif args.command == "keep":
        keep_records(args.tuned, args.records, args.best)
    elif args.command == "round":
        measure_round(args.folder, args.runtime, args.out)
    else:
        measure(args.bundle, args.out, args.torch_models, args.torch_modes, args.torch_precisions)


if __name__ == "__main__":
    main()
