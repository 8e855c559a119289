"""Distill on another machine (a GPU one): pack a case's model, calibration samples and pipelines here, make the
students there, and judge and time them here with bench_distill.py.

    python benchmarks/remote_distill.py pack --cases hama-asr --seconds 300 --out build/remote-distill
    # on the GPU machine, in a copy of this repository holding build/remote-distill:
    python benchmarks/remote_distill.py make build/remote-distill --out STUDENTS
    # back here:
    python benchmarks/bench_distill.py --cases hama-asr --only distill --students STUDENTS

The GPU machine needs numpy, onnx, onnxruntime and torch; `pack` puts the wheels of onnx-graphsurgeon and
networkx beside the samples (`make` installs them into the pack's folder without a network). Each student's
report (`<label>.json`) holds what `distill` did there, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
WHEELS = ("onnx-graphsurgeon==0.6.1", "networkx==3.6.1")


def pack(cases: list[str], seconds: float, out: Path, work: Path) -> None:
    """Write each case's fp32 model, its calibration samples (a folder of .npz) and its distilled pipelines."""
    sys.path.insert(0, str(BENCHMARKS))
    import shutil

    from bench_distill import distilled_pipelines
    from cases import trained_cases

    from onnxforge.data import save_samples

    out.mkdir(parents=True, exist_ok=True)
    for case in trained_cases(work, cases):
        folder = out / case.name
        shutil.rmtree(folder, ignore_errors=True)  # a pack made before: its samples would stay beside the new ones
        folder.mkdir()
        shutil.copyfile(case.model_path, folder / "model.onnx")
        save_samples(folder / "calibration", case.calibration, layout="folder")
        (folder / "pipelines.json").write_text(json.dumps(distilled_pipelines(case.name, seconds), indent=2))
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(out / "wheels"),
         *WHEELS],
        check=True,
    )  # fmt: skip


def make(packed: Path, out: Path, only: list[str]) -> None:
    """Run every packed pipeline (whose label holds one of `only`, if given) on its case's model and samples;
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

    for folder in sorted(path for path in packed.iterdir() if (path / "pipelines.json").exists()):
        target = out / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for label, passes in json.loads((folder / "pipelines.json").read_text()).items():
            if only and not any(part in label for part in only):
                continue
            print(f"{folder.name}: {label}: {passes}", flush=True)
            model, report = optimize(str(folder / "model.onnx"), passes, data=str(folder / "calibration"),
                                     budget="none", seed=0)  # fmt: skip
            save_model(model, target / f"{_file_name(label)}.onnx")
            made = {"passes": passes, "machine": _machine(), "report": report.to_dict()}
            (target / f"{_file_name(label)}.json").write_text(json.dumps(made, indent=2, default=str))


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
    making.add_argument("--only", default="", help="comma-separated parts of the labels to make")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.cases.split(","), args.seconds, args.out, args.work)
    else:
        make(args.packed, args.out, [part for part in args.only.split(",") if part])
    return 0


if __name__ == "__main__":
    sys.exit(main())
