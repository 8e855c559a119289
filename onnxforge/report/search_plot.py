"""The plot of a search: every timed candidate's speed against the error it spent, the Pareto front and the winner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from onnxforge.ir.output_set import OutputSet


def save_search_plot(report: dict[str, Any], path: str | os.PathLike, outputs: OutputSet | None = None) -> None:
    """Draw the search `report` (optimize --auto's) to `path`, its format from the suffix (.svg, .png, .pdf);
    written atomically (with `outputs`, as one of its files)."""
    if outputs is None:
        with OutputSet() as own:
            save_search_plot(report, path, own)
            own.commit()
        return
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    from matplotlib.figure import Figure

    budgeted = report["setup"]["budget"].strip().lower() != "none"
    timed = [row for row in report["trials"] if row["speedup"] and not row["rejected"] and row["same_as"] is None]
    front = sorted(report["pareto_front"], key=lambda row: row["speedup"])
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.scatter([r["speedup"] for r in timed], [r["error"] for r in timed], s=18, color="0.6", label="candidate")
    axes.plot([r["speedup"] for r in front], [r["error"] for r in front], "o-", color="tab:blue", label="Pareto front")
    winner = report.get("winner")
    if winner:
        row = next(r for r in report["trials"] if r["number"] == winner["trial"])
        axes.scatter([min(winner["speedups"])], [row["error"]], marker="*", s=220, color="tab:red", zorder=3,
                     label=f"winner (trial {winner['trial']}, confirmed)")
    axes.axvline(1.0, color="0.3", linewidth=0.8, linestyle=":")
    if budgeted:
        axes.axhline(1.0, color="tab:red", linewidth=0.8, linestyle="--", label="budget")
    axes.set_xlabel("speed against the input (above 1: faster)")
    axes.set_ylabel("fraction of the budget spent" if budgeted else "1 - worst cosine (or max rel)")
    axes.set_title(f"search '{report['study']}': {report['counts']['trials']} trials")
    axes.legend(loc="best", fontsize="small")
    figure.savefig(outputs.stage_file(path), format=Path(path).suffix.lstrip(".") or "svg")
