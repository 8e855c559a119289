"""Distill on another machine (a GPU one): pack a case's model, calibration and held-out samples and pipelines here,
make the students there, and judge and time them here with bench_distill.py.

    python benchmarks/remote_distill.py pack --cases hama-asr --seconds 300 --out build/remote-distill
    # on the GPU machine, in a copy of this repository holding build/remote-distill:
    python benchmarks/remote_distill.py make build/remote-distill --out STUDENTS
    # back here:
    python benchmarks/bench_distill.py --cases hama-asr --only distill --students STUDENTS

A model over PART_BYTES is packed in numbered parts, which `make` joins: carry them over several calls (what an
earlier call carried stays on a warm machine). The GPU machine needs numpy, onnx, onnxruntime and torch; `pack`
puts the wheels of onnx-graphsurgeon and networkx beside the samples (`make` installs them into the pack's folder
without a network). Each student's report (`<label>.json`) holds what `distill` did there, the machine it ran on,
and its agreement with the fp32 model on the case's held-out samples, judged there (for a student too large to
bring back).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
WHEELS = ("onnx-graphsurgeon==0.6.1", "networkx==3.6.1")
PART_BYTES = 40 * 2**20  # one call to the GPU machine carries at most 64 MiB


def pack(cases: list[str], seconds: float, out: Path, work: Path) -> None:
    """Write each case's fp32 model (in parts of at most PART_BYTES when larger, so that each call to the other
    machine may carry one), its calibration and held-out samples (folders of .npz) and its distilled pipelines."""
    sys.path.insert(0, str(BENCHMARKS))
    import shutil

    from bench_distill import MORE_CALIBRATION, distilled_pipelines
    from cases import trained_cases
    from cases.minilm_encoder import with_more_calibration_text

    from onnxforge.data import save_samples

    out.mkdir(parents=True, exist_ok=True)
    for case in trained_cases(work, cases):
        if case.name in MORE_CALIBRATION:  # as bench_distill.py calibrates it
            case = with_more_calibration_text(case, MORE_CALIBRATION[case.name])
        folder = out / case.name
        shutil.rmtree(folder, ignore_errors=True)  # a pack made before: its samples would stay beside the new ones
        folder.mkdir()
        _copy_in_parts(Path(case.model_path), folder / "model.onnx")
        save_samples(folder / "calibration", case.calibration, layout="folder")
        save_samples(folder / "held_out", case.held_out, layout="folder")
        pipelines = {label: _unmeasured(passes) for label, passes in distilled_pipelines(case.name, seconds).items()}
        (folder / "pipelines.json").write_text(json.dumps(pipelines, indent=2))
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(out / "wheels"),
         *WHEELS],
        check=True,
    )  # fmt: skip


def _unmeasured(passes: str) -> str:
    """`passes` with no compressing pass judged by its speed on the machine that trains: its students are timed
    here, where a pass of the same pipeline measured its speed-up (another CPU could step it back)."""
    parts = []
    for part in passes.split(","):
        name = part.split(":")[0]
        if name in ("prune", "lowrank"):
            part += ":measure=false"
        elif name == "quant":
            part = ":".join(o for o in part.split(":") if not o.startswith("min_speedup=")) + ":min_speedup=0"
        parts.append(part)
    return ",".join(parts)


def _copy_in_parts(source: Path, target: Path) -> None:
    """`target` as a copy of `source`, or, when larger than PART_BYTES, as `<target>.<i>-of-<n>` parts."""
    data = source.read_bytes()
    count = -(-len(data) // PART_BYTES)
    if count <= 1:
        target.write_bytes(data)
        return
    for index in range(count):
        part = data[index * PART_BYTES : (index + 1) * PART_BYTES]
        target.with_name(f"{target.name}.{index + 1}-of-{count}").write_bytes(part)


def _joined(target: Path) -> Path:
    """`target`, joined from its parts when it was packed in parts (SystemExit naming those missing)."""
    parts = sorted(target.parent.glob(f"{target.name}.*-of-*"), key=lambda p: int(p.name.split(".")[-1].split("-")[0]))
    if target.exists() or not parts:
        return target
    count = int(parts[0].name.rsplit("-", 1)[1])
    if len(parts) != count:
        raise SystemExit(f"{target}: {count - len(parts)} of its {count} parts are not here")
    target.write_bytes(b"".join(part.read_bytes() for part in parts))
    return target


def make(packed: Path, out: Path, labels: list[str]) -> None:
    """Run every packed pipeline (whose label is one of `labels`, if given) on its case's model and samples;
    write `<case>/<label>.onnx` and `.json`."""
    site = packed / "site"
    if not site.exists():
        wheels = sorted(str(path) for path in (packed / "wheels").glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site),
                        *wheels], check=True)  # fmt: skip
    sys.path.insert(0, str(site))
    sys.path.insert(0, str(BENCHMARKS.parent))
    from onnxforge import optimize
    from onnxforge.ir import save_model
    from onnxforge.pipeline.manager import Instrument

    class Log(Instrument):
        """Each pass's start and the running pass's progress lines, timed, on stdout."""

        def before_pass(self, index, total, pass_, model) -> None:
            print(f"{time.strftime('%H:%M:%S')} {type(pass_).__name__}", flush=True)

        def progress(self, line: str) -> None:
            print(f"{time.strftime('%H:%M:%S')}   {line}", flush=True)

    for folder in sorted(path for path in packed.iterdir() if (path / "pipelines.json").exists()):
        target = out / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for label, passes in json.loads((folder / "pipelines.json").read_text()).items():
            if labels and label not in labels:
                continue
            print(f"{folder.name}: {label}: {passes}", flush=True)
            source = _joined(folder / "model.onnx")
            model, report = optimize(str(source), passes, data=str(folder / "calibration"), budget="none", seed=0,
                                     instruments=[Log()])  # fmt: skip
            save_model(model, target / f"{_file_name(label)}.onnx")
            made = {"passes": passes, "machine": _machine(), "report": report.to_dict(),
                    "held_out": _agreement(source, target / f"{_file_name(label)}.onnx", folder / "held_out")}  # fmt: skip
            (target / f"{_file_name(label)}.json").write_text(json.dumps(made, indent=2, default=str))


def _agreement(teacher: Path, student: Path, held_out: Path) -> dict:
    """The worst and mean cosine, over the held-out samples, of each float output of `student` against
    `teacher`'s (onnxruntime on this machine's CPU): the judge where a student is too large to bring back."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from onnxforge.data import load_samples

    samples = load_samples(held_out, onnx.load(str(teacher), load_external_data=False))
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (teacher, student)]
    cosines: dict[str, list[float]] = {}
    for sample in samples:
        want, got = (dict(zip([o.name for o in s.get_outputs()], s.run(None, dict(sample)))) for s in sessions)
        for name, value in want.items():
            if value.dtype.kind == "f":
                a, b = value.ravel().astype(np.float64), got[name].ravel().astype(np.float64)
                cosines.setdefault(name, []).append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return {
        name: {"worst_cosine": min(values), "mean_cosine": float(np.mean(values)), "samples": len(values)}
        for name, values in cosines.items()
    }


def student_path(students: Path, case: str, label: str) -> Path:
    """Where `make` wrote the student of a case's variant."""
    return students / case / f"{_file_name(label)}.onnx"


def _file_name(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label)


def _machine() -> dict:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    return {"processor": platform.processor(), "python": platform.python_version(), "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack")
    packing.add_argument("--cases", default="hama-asr")
    packing.add_argument("--seconds", type=float, default=300.0, help="distill's time limit per student")
    packing.add_argument("--out", type=Path, required=True)
    packing.add_argument("--work", type=Path, default=Path("/tmp/onnxforge-trained"))
    making = commands.add_parser("make")
    making.add_argument("packed", type=Path)
    making.add_argument("--out", type=Path, required=True)
    making.add_argument("--labels", nargs="*", default=[], help="the labels of the students to make (all if none)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.cases.split(","), args.seconds, args.out, args.work)
    else:
        make(args.packed, args.out, args.labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
