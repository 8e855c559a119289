"""Measure one round of MetaSchedule's CUDA candidates on this machine's GPU with the TVM runtime alone.

A round folder, written by `RoundRunner` (onnxforge/backends/tvm/round_runner.py) where the TVM compiler is,
holds `round.json` (each candidate's library and argument shapes) and the libraries, which keep their CUDA
source. Copy this file and loader.py beside each other on the GPU machine and run

    python measure_candidates.py ROUND_FOLDER --out results.json [--jobs 16]

It compiles every candidate's CUDA source with NVRTC in parallel worker processes, then loads and times the
candidates one by one on random arguments of their shapes (TVM's time evaluator) in a child process: when a
candidate kills that process, it is reported as failed and another process measures the rest. The results
file gives each candidate's run times in seconds, or its error, and how long compiling and timing took.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loader  # noqa: E402 (shipped beside this file)

NUMBER, REPEAT = 20, 5  # each candidate: REPEAT times of the mean of NUMBER back-to-back launches
MEASURED = "measured.jsonl"  # one line per candidate measured, so that a crash keeps what came before


def measure_round(folder: Path, out: Path, jobs: int) -> dict:
    """Compile, load and time every candidate of `folder`; write the results to `out` and return them."""
    manifest = json.loads((folder / "round.json").read_text())
    candidates = manifest["candidates"]
    cache = folder / "cubin"
    cache.mkdir(exist_ok=True)
    (folder / MEASURED).unlink(missing_ok=True)
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with context.Pool(jobs) as pool:
        errors = pool.map(_compile, [(str(folder / c["library"]), str(cache), manifest["arch"]) for c in candidates])
    compile_s = time.perf_counter() - start
    results = {c["id"]: {"error": f"NVRTC: {error}"} for c, error in zip(candidates, errors) if error}
    pending = [c for c in candidates if c["id"] not in results]
    start = time.perf_counter()
    while pending:
        child = context.Process(target=_measure, args=(pending, str(folder), str(cache)))
        child.start()
        child.join()
        results.update(_read_measured(folder))
        pending = [c for c in pending if c["id"] not in results]
        if child.exitcode != 0 and pending:  # the first candidate not measured took the process down
            results[pending.pop(0)["id"]] = {"error": f"the measuring process died (exit code {child.exitcode})"}
    measure_s = time.perf_counter() - start
    report = {
        "round": manifest["round"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": _gpu_name(),
        "candidates_count": len(candidates),
        "compile_s": round(compile_s, 2),
        "measure_s": round(measure_s, 2),
        "number": NUMBER,
        "repeat": REPEAT,
        "candidates": results,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _compile(job: tuple[str, str, str]) -> str | None:
    """Compile the CUDA source of one library with NVRTC into the cache (keyed by the source); its error, if any."""
    library, cache, arch = job
    import tvm_ffi

    from tvm.support import nvcc

    def compile_and_keep(code, *_):
        binary = nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")
        (Path(cache) / _key(code)).write_bytes(binary)
        return binary

    loader.enable_cuda_runtime()
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_and_keep, override=True)
    try:
        _load(library)
    except Exception as exc:  # NVRTC's and TVM's errors alike: the candidate fails, the round goes on
        return _last_line(exc)
    return None


def _measure(candidates: list[dict], folder: str, cache: str) -> None:
    """Time each candidate on the GPU and append its result to the folder's measured lines."""
    import tvm
    import tvm_ffi

    def cached(code, *_):
        return (Path(cache) / _key(code)).read_bytes()

    loader.enable_cuda_runtime()
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", cached, override=True)
    device, arguments = tvm.cuda(0), {}
    rng = np.random.default_rng(0)
    with open(Path(folder) / MEASURED, "a") as measured:
        for candidate in candidates:
            try:
                module = _load(str(Path(folder) / candidate["library"]))
                key = json.dumps(candidate["args"])
                if key not in arguments:
                    arguments[key] = [_random_tensor(rng, dtype, shape, device) for dtype, shape in candidate["args"]]
                evaluate = module.time_evaluator(module.entry_name, device, number=NUMBER, repeat=REPEAT)
                device.sync()
                result = {"run_secs": [float(t) for t in evaluate(*arguments[key]).results]}
            except Exception as exc:  # a launch error: the candidate fails, the round goes on
                result = {"error": _last_line(exc)}
            measured.write(json.dumps({"id": candidate["id"], **result}) + "\n")
            measured.flush()


def _load(library: str):
    import tvm

    return tvm.runtime.load_module(library)


def _random_tensor(rng: np.random.Generator, dtype: str, shape: list[int], device):
    """Normal floats; zeros for integers, so that indices stay in bounds."""
    import tvm

    kind = np.dtype(dtype).kind
    values = rng.standard_normal(shape).astype(dtype) if kind == "f" else np.zeros(shape, dtype=dtype)
    return tvm.runtime.tensor(values, device)


def _read_measured(folder: Path) -> dict[str, dict]:
    path = folder / MEASURED
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {entry.pop("id"): entry for entry in entries}


def _key(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()[:24] + ".cubin"


def _last_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _gpu_name() -> str:
    import tvm

    loader.enable_cuda_runtime()
    device = tvm.cuda(0)
    return str(device.device_name) if device.exist else "no CUDA GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the round folder (round.json and the candidates' libraries)")
    parser.add_argument("--out", type=Path, required=True, help="write the results to this JSON file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="NVRTC compiles in parallel")
    args = parser.parse_args(argv)
    report = measure_round(args.folder, args.out, args.jobs)
    failed = sum(1 for entry in report["candidates"].values() if "error" in entry)
    print(f"round {report['round']}: {report['candidates_count']} candidates, {failed} failed; "
          f"NVRTC {report['compile_s']:.1f} s, timing {report['measure_s']:.1f} s on {report['gpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
