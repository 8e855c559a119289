"""Put two runs of one benchmark side by side (a change against its baseline): per case and variant, the agreement
metrics, the size and the speed of each run, and whether the model files are the same size.

    python benchmarks/compare_results.py BEFORE.json AFTER.json --labels "before,after" --out results/x.md

Agreement and size come from the model each run wrote, so a change that keeps numerics shows equal figures; speed
is each run's own ratio against fp32 in that run, so it moves with the machine's load between the two runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--labels", default="before,after", help="names of the two runs, comma-separated")
    parser.add_argument("--out", type=Path, help="write the table here (markdown); else print it")
    args = parser.parse_args()
    labels = [label.strip() for label in args.labels.split(",")]
    if len(labels) != 2:
        parser.error("--labels takes two names")
    runs = [json.loads(path.read_text()) for path in (args.before, args.after)]
    text = side_by_side(runs, labels)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


def side_by_side(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """A markdown page: when and where each run was taken, then one table per case."""
    lines = ["| run | taken | quick | onnxforge | onnxruntime |", "|---|---|---|---|---|"]
    for label, run in zip(labels, runs):
        setup, environment = run.get("setup", {}), run.get("environment", {})
        lines.append(
            f"| {label} | {setup.get('date', '')} | {setup.get('quick', '')} | {environment.get('onnxforge', '')} "
            f"| {environment.get('onnxruntime', '')} |"
        )
    cases = [{result["case"]: result for result in run.get("results", [])} for run in runs]
    for case in dict.fromkeys([*cases[0], *cases[1]]):
        before, after = (run.get(case, {}).get("variants", {}) for run in cases)
        lines += ["", f"## {case}", "", f"| variant | agreement {labels[0]} | agreement {labels[1]} | same size "
                  f"| speed {labels[0]} | speed {labels[1]} |", "|---|---|---|---|---|---|"]
        for variant in dict.fromkeys([*before, *after]):
            old, new = before.get(variant, {}), after.get(variant, {})
            lines.append(
                f"| {variant} | {_agreement(old)} | {_agreement(new)} | {_same_size(old, new)} "
                f"| {_speed(old)} | {_speed(new)} |"
            )
    return "\n".join(lines) + "\n"


def _agreement(variant: dict[str, Any]) -> str:
    if not variant:
        return "absent"
    if variant.get("failure"):
        return "failed"
    return ", ".join(f"{name} {value:.4f}" for name, value in (variant.get("agreement") or {}).items())


def _same_size(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'yes' or 'no' when both runs recorded the model's bytes, else empty (a benchmark that counts parameters)."""
    if old.get("bytes") is None or new.get("bytes") is None:
        return ""
    return "yes" if old["bytes"] == new["bytes"] else "no"


def _speed(variant: dict[str, Any]) -> str:
    speedup = variant.get("speedup")
    return f"{speedup:.2f}x" if isinstance(speedup, (int, float)) else ""


if __name__ == "__main__":
    main()
