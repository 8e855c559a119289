"""The HTML report: one self-contained page of an optimize report or a search report (optimize --auto's), read
from the dict either writes as JSON. Jinja2 lays it out with autoescaping on (model, pass and study names are the
model file's or the user's text); the CSS is inline and the plots are matplotlib's SVG, inline: nothing is
fetched when the page opens."""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from onnxforge.errors import OnnxforgeError
from onnxforge.ir.output_set import OutputSet
from onnxforge.report.optimization import labels_read_on

if TYPE_CHECKING:
    import jinja2

HTML_SUFFIXES = (".html", ".htm")  # --report writes HTML to a path ending so, JSON to any other

STATUS_COLORS = {"applied": "tab:green", "unchanged": "0.65", "rolled_back": "tab:orange", "failed": "tab:red"}
TRIAL_COLORS = {"accepted": "tab:blue", "Pareto front": "tab:green", "rejected": "tab:red"}
FLOAT_COLOR, CHANGED_COLOR = "0.65", "tab:blue"  # a layer left in float, one quantized (or changed)
SENSITIVITY_BARS = 30  # the most layers a sensitivity plot shows: the largest errors
LABEL_CHARS = 48  # a layer name longer than this is shown by its end (where exporters put what tells layers apart)

NOT_A_REPORT = "not an onnxforge report: give the JSON that optimize --report (with or without --auto) wrote"


class ReportError(OnnxforgeError):
    """A file that is not a report onnxforge wrote, or cannot be read."""


def render_html(report: dict[str, Any]) -> str:
    """The page of `report`: an optimize report (`OptimizationReport.to_dict`, or optimize --json's object) or a
    search report, told apart by their keys; ReportError for anything else."""
    kind = _kind(report)
    if kind is None:
        raise ReportError(NOT_A_REPORT)
    view = _optimize_view(report) if kind == "optimize" else _search_view(report)
    return _environment().get_template(f"{kind}.html").render(view)


def save_html(report: dict[str, Any], path: str | os.PathLike, outputs: OutputSet | None = None) -> None:
    """Write the page of `report` atomically (with `outputs`, as one of its files)."""
    if outputs is None:
        with OutputSet() as own:
            save_html(report, path, own)
            own.commit()
        return
    outputs.stage_file(path).write_text(render_html(report), encoding="utf-8")


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The report a JSON file holds; ReportError when the file is missing, not JSON or not a report."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"no report at {path}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path} is not a JSON report: {exc}") from None
    if _kind(report) is None:
        raise ReportError(f"{path} is {NOT_A_REPORT}")
    return report


def _kind(report: Any) -> str | None:
    """Which report this is, by the keys each kind has: "optimize", "search", or None for anything else."""
    if isinstance(report, dict) and {"passes", "size"} <= report.keys():
        return "optimize"
    if isinstance(report, dict) and {"setup", "trials", "pareto_front"} <= report.keys():
        return "search"
    return None


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2  # here, not on import: most runs write no page

    return jinja2.Environment(
        loader=jinja2.PackageLoader("onnxforge.report", "templates"),
        autoescape=True,  # every string shown comes from the report: never markup
        undefined=jinja2.StrictUndefined,  # a name the view lacks is a bug, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _optimize_view(report: dict[str, Any]) -> dict[str, Any]:
    passes = report["passes"]
    latency = report.get("latency")
    budget = report.get("budget")
    decisions = report.get("decisions") or {}
    return {
        "title": f"onnxforge report: {Path(str(report['source'])).name}",
        "version": (report.get("environment") or {}).get("onnxforge", ""),
        "source": report["source"],
        "output": report.get("output"),
        "artifact": report.get("artifact") or [],
        "warnings": report.get("warnings") or [],
        "inputs_notes": _inputs_notes(report),
        "before_after": _before_after(report),
        "latency_setup": (latency.get("setup") or {}).get("description", "") if latency else "",
        "errors": _error_rows(report),
        "budget": budget,
        "budget_spent": _percent(budget.get("fraction_spent")) if budget else "",
        "budget_labels": labels_read_on(budget) if budget else "",
        "passes": [_pass_row(index, record) for index, record in enumerate(passes, 1)],
        "layer_tables": [table for index, record in enumerate(passes, 1) if (table := _layer_table(index, record))],
        "decisions": _decision_rows(decisions),
        "decisions_replayed_from": decisions.get("replayed_from"),
        "verification": _flat_rows(report.get("verification") or {}),
        "environment": _flat_rows(report.get("environment") or {}),
        "pass_time_plot": _pass_time_plot(passes) if passes else None,
        "latency_plot": _latency_plot(latency) if latency and latency.get("after") else None,
    }


def _inputs_notes(report: dict[str, Any]) -> list[str]:
    """What the run did to the model's inputs, as the terminal summary says it."""
    notes = []
    if report.get("inputs_made_constant"):
        notes.append(f"input(s) {', '.join(report['inputs_made_constant'])} had a default value (an initializer of "
                     "the same name) and are now constants: the optimized model no longer takes them")
    fixed = report.get("inputs_fixed")
    if fixed:
        shapes = " ".join(f"{name}={'x'.join(map(str, dims))}" for name, dims in fixed["shapes"].items())
        notes.append(f"inputs fixed to {shapes} for {fixed['backend']}, which compiles for static shapes only; "
                     "the optimized model keeps them")
    return notes


def _before_after(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, before, after, change) for the model's size and, when measured, its latency."""
    before, after = report["size"]["before"], report["size"]["after"]
    rows = [
        ("nodes", f"{before['nodes']:,}", f"{after['nodes']:,}", _change(before["nodes"], after["nodes"])),
        ("parameters", f"{before['params']:,}", f"{after['params']:,}", _change(before["params"], after["params"])),
        ("weights", _megabytes(before["bytes"]), _megabytes(after["bytes"]), _change(before["bytes"], after["bytes"])),
    ]
    latency = report.get("latency")
    if latency and latency.get("after"):
        was, now = latency["before"], latency["after"]
        speedup = f"speedup {latency['speedup']:.2f}x" if latency.get("speedup") else ""
        rows.append(("latency, median", _ms(was["median_ms"]), _ms(now["median_ms"]), speedup))
        rows.append(("latency, 90th percentile", _ms(was["p90_ms"]), _ms(now["p90_ms"]), ""))
    return rows


def _error_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(measured on, max relative error, worst cosine, worst top-1 agreement, largest mismatch) of the final model
    against the original."""
    rows = []
    samples = report.get("error_vs_original_on_data_samples")
    for key, where in (
        ("error_vs_original", "random inputs (verification)"),
        ("error_vs_original_on_data", _held_out(samples) if samples else "--data samples"),
    ):
        error = report.get(key)
        if error:
            rows.append((
                where,
                _number(error.get("max_rel")),
                _number(error.get("min_cosine"), 6),
                _percent(error.get("min_top1_agreement")),
                _percent(error.get("max_mismatch_fraction")),
            ))
    return rows


def _held_out(samples: dict[str, int]) -> str:
    if samples["held_out"] == samples["of"]:
        return f"all {samples['of']} --data samples (fewer than 4: none held out from calibration)"
    return f"{samples['held_out']} of {samples['of']} --data samples, held out from calibration"


def _pass_row(index: int, record: dict[str, Any]) -> dict[str, Any]:
    before, after = record["before"], record["after"]
    counters = {
        key: value for key, value in (record.get("stats") or {}).items()
        if isinstance(value, (int, float, str)) and value not in (0, "", None)
    }
    return {
        "index": index,
        "name": record["name"],
        "status": record["status"],
        "time": _seconds(record["seconds"]),
        "nodes": _arrow(before["nodes"], after["nodes"], str),
        "params": _arrow(before["params"], after["params"], lambda n: f"{n:,}"),
        "weights": _arrow(before["bytes"], after["bytes"], _megabytes),
        "counters": ", ".join(f"{key}={_number(value, 6) if isinstance(value, float) else value}"
                              for key, value in counters.items()),
        "budget": record.get("budget") or "",
        "error": record.get("error") or "",
        "max_rel": _number(record.get("max_rel_error_vs_previous")),
        "notes": list(dict.fromkeys(record.get("notes") or [])),  # rounds of a pass repeat its notes
        "members": record.get("members") or [],
    }


# pass -> (what its per-layer table shows, the column of its decision); a pass not named here: per-layer decisions
_LAYER_TABLES = {
    "quant": ("precision per layer", "precision"),
    "prune": ("channels kept", "kept"),
    "lowrank": ("rank per layer", "rank"),
}


def _layer_table(index: int, record: dict[str, Any]) -> dict[str, Any] | None:
    """The decisions per layer a pass record carries ("layers"), as a table, with an error column and a plot of it
    where the pass measured an error per layer; None for a record without them."""
    layers = record.get("layers") or []  # every row, two alike too: unnamed layers of one op read the same
    if not layers:
        return None
    kind = record["name"].split(":")[0]
    what, column = _LAYER_TABLES.get(kind, ("decisions per layer", "decision"))
    measured = [layer for layer in layers if layer.get("error") is not None]
    rows = [
        (layer["layer"], layer["decision"], layer["why"], *([_number(layer.get("error"))] if measured else []))
        for layer in layers
    ]
    plotted = [layer for layer in measured if math.isfinite(layer["error"])]
    shown = sorted(plotted, key=lambda layer: -layer["error"])[:SENSITIVITY_BARS]
    which = f"the {len(shown)} largest of {len(plotted)}" if len(shown) < len(plotted) else f"all {len(shown)}"
    return {
        "index": index,
        "name": record["name"],
        "status": record["status"],
        "what": what,
        "head": ["layer", column, "why", *(["error"] if measured else [])],
        "rows": rows,
        "error_text": "; ".join(dict.fromkeys(layer.get("error_text") or "" for layer in measured)),
        "plot": _sensitivity_plot(index, kind, shown) if shown else None,
        "plot_caption": f"The error measured per layer, largest on top ({which}); grey: the layer stayed float, "
                        f"blue: {'quantized' if kind == 'quant' else 'changed'}.",
    }


def _decision_rows(decisions: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(decision, value chosen, what was measured for it) of each measured decision the run recorded."""
    timings = decisions.get("timings") or {}
    return [
        (key, json.dumps(value), _measured(timings.get(key)))
        for key, value in (decisions.get("values") or {}).items()
    ]


def _measured(timing: Any) -> str:
    speedups = timing.get("speedups") if isinstance(timing, dict) else None
    if isinstance(speedups, dict):
        return "; ".join(f"{candidate}: {_speedup(value)}" for candidate, value in speedups.items())
    if isinstance(speedups, list):
        return ", ".join(_speedup(value) for value in speedups)
    return "" if timing is None else json.dumps(timing)


def _search_view(report: dict[str, Any]) -> dict[str, Any]:
    setup = report["setup"]
    front = {row["number"] for row in report["pareto_front"]}
    winner = report.get("winner")
    model = Path(str(setup.get("model", ""))).name
    return {
        "title": f"onnxforge search: {model}",
        "version": (report.get("environment") or {}).get("onnxforge", ""),
        "model": model,
        "study": report.get("study", ""),
        "counts": report["counts"],
        "seconds": report.get("seconds"),
        "message": report.get("message", ""),
        "setup": _flat_rows({**setup, "min_speedup": report.get("min_speedup")}),
        "space": _space_view(report.get("space") or {}),
        "trials": [_trial_row(row, front, winner) for row in report["trials"]],
        "winner_marked": [i for i, row in enumerate(report["trials"]) if winner and row["number"] == winner["trial"]],
        "winner_rows": _winner_rows(winner) if winner else [],
        "environment": _flat_rows(report.get("environment") or {}),
        "pareto_plot": _pareto_plot(report),
        "trial_plot": _trial_plot(report) if report["trials"] else None,
    }


def _winner_rows(winner: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("trial", str(winner["trial"])),
        ("passes", winner.get("pipeline") or "(no pass)"),
        ("session", _session(winner.get("session") or {})),
        ("confirmed: timed again against the input", ", ".join(_speedup(value) for value in winner["speedups"])),
        ("error", f"{winner['error_text']} on {winner['judged_on']}"),
        ("size against the input", _number(winner.get("size_ratio"), 3)),
    ]


def _space_view(space: dict[str, Any]) -> dict[str, Any]:
    searched = []
    for name, options in (space.get("searched") or {}).items():
        searched += [(name, option, _values(values)) for option, values in options.items()] or [(name, "", "")]
    return {
        "always": ", ".join(map(str, space.get("always") or [])),
        "searched": searched,  # (pass, option, its values); a pass with no option is only in or out
        "session": [(option, _values(values)) for option, values in (space.get("session") or {}).items()],
        "size": space.get("size"),
    }


def _trial_row(row: dict[str, Any], front: set[int], winner: dict[str, Any] | None) -> tuple[Any, ...]:
    """The cells of a trial's row: number, passes, session, speed, latencies, error, size, time, outcome."""
    if row.get("rejected"):
        outcome = f"rejected: {row['rejected']}"
    elif row.get("same_as") is not None:
        outcome = f"the same model as trial {row['same_as']}"
    else:
        outcome = ""
    marks = [mark for mark, holds in (("winner", winner and winner["trial"] == row["number"]),
                                      ("Pareto front", row["number"] in front)) if holds]
    return (
        row["number"],
        row.get("pipeline") or "(no pass)",
        _session(row.get("session") or {}),
        _speedup(row.get("speedup")),
        _ms(row.get("latency_ms")),
        _ms(row.get("input_latency_ms")),
        row.get("error_text") or "",
        _number(row.get("size_ratio"), 3),
        _seconds(row.get("seconds")),
        "; ".join(part for part in (", ".join(marks), outcome) if part),
    )


def _session(session: dict[str, Any]) -> str:
    return ", ".join(f"{key}={'default' if value is None else value}" for key, value in session.items())


def _values(values: Any) -> str:
    """A tunable's values as the space describes them: a list of values, or {"leave out any of": [...]}."""
    if isinstance(values, dict):
        return "; ".join(f"{how}: {_values(items)}" for how, items in values.items())
    return ", ".join(map(str, values)) if isinstance(values, list) else str(values)


def _svg(draw: Callable[[Any], str], salt: str, size: tuple[float, float]) -> Markup:
    """The SVG element of a matplotlib figure that `draw(axes)` fills (it returns the figure's title). Text stays
    text (the page's fonts, searchable) and is never read as mathtext; the ids inside are salted by `salt`, so
    that two plots of one page share none, and the same report draws the same bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    from matplotlib.figure import Figure

    settings = {"svg.fonttype": "none", "svg.hashsalt": salt, "text.parse_math": False}
    with matplotlib.rc_context(settings):
        figure = Figure(figsize=size, layout="constrained")
        axes = figure.add_subplot()
        axes.set_title(draw(axes))
        text = io.StringIO()
        figure.savefig(text, format="svg", metadata={"Date": None})
    svg = text.getvalue()
    # Without the XML declaration and doctype, which HTML has no place for; matplotlib escaped the text inside.
    return Markup(svg[svg.index("<svg"):])


def _pass_time_plot(passes: list[dict[str, Any]]) -> Markup:
    from matplotlib.patches import Patch

    def draw(axes) -> str:
        names = [f"{index}. {record['name']}" for index, record in enumerate(passes, 1)]
        colors = [STATUS_COLORS.get(record["status"], "tab:blue") for record in passes]
        axes.barh(names, [record["seconds"] for record in passes], color=colors)
        axes.invert_yaxis()  # the first pass on top, as in the table
        axes.set_xlabel("seconds")
        shown = dict.fromkeys(record["status"] for record in passes)
        handles = [Patch(color=STATUS_COLORS.get(status, "tab:blue"), label=status) for status in shown]
        axes.legend(handles=handles, loc="lower right", fontsize="small")
        return "time per pass"

    return _svg(draw, "pass-times", (7, 1.5 + 0.35 * len(passes)))


def _latency_plot(latency: dict[str, Any]) -> Markup:
    def draw(axes) -> str:
        stats = [latency["before"], latency["after"]]
        medians = [row["median_ms"] for row in stats]
        spread = [[m - row["min_ms"] for m, row in zip(medians, stats)],
                  [row["p90_ms"] - m for m, row in zip(medians, stats)]]
        bars = axes.bar(["before", "after"], medians, yerr=spread, capsize=8, color=["0.65", "tab:blue"])
        axes.bar_label(bars, labels=[_ms(m) for m in medians], label_type="center")
        axes.set_ylabel("ms")
        setup = latency.get("setup") or {}
        return f"latency on {setup.get('backend', '')} {setup.get('target', '')}".strip()

    return _svg(draw, "latency", (5, 3.5))


def _pareto_plot(report: dict[str, Any]) -> Markup | None:
    """Every timed trial's latency against the error it spent (marker area: its size against the input's), the
    Pareto front and the winner; None when no trial was timed. The latency is the trial's against the input's
    timed beside it (1 / its speed-up): the figure the front is chosen on, comparable across trials that ran
    while the machine's load changed."""
    timed = [row for row in report["trials"] if row.get("speedup") and not row.get("rejected")
             and row.get("same_as") is None]
    if not timed:
        return None
    budgeted = str(report["setup"].get("budget", "")).strip().lower() != "none"

    def draw(axes) -> str:
        area = [30 + 270 * min(row.get("size_ratio") or 1.0, 2.0) for row in timed]
        axes.scatter([1 / row["speedup"] for row in timed], [row["error"] for row in timed], s=area, color="0.6",
                     alpha=0.6, label="trial (area: size against the input)")
        front = sorted((row for row in report["pareto_front"] if row.get("speedup")), key=lambda row: -row["speedup"])
        axes.plot([1 / row["speedup"] for row in front], [row["error"] for row in front], "o-", color="tab:blue",
                  label="Pareto front")
        winner = report.get("winner")
        if winner:
            row = next(row for row in report["trials"] if row["number"] == winner["trial"])
            axes.scatter([1 / min(winner["speedups"])], [row["error"]], marker="*", s=260, color="tab:red",
                         zorder=3, label=f"winner (trial {winner['trial']}, as confirmed)")
        axes.axvline(1.0, color="0.3", linewidth=0.8, linestyle=":", label="the input")
        if budgeted:
            axes.axhline(1.0, color="tab:red", linewidth=0.8, linestyle="--", label="budget")
        axes.set_xlabel("latency against the input's (below 1: faster)")
        axes.set_ylabel("fraction of the budget spent" if budgeted else "1 - worst cosine (or max rel)")
        axes.legend(loc="best", fontsize="small")
        return f"{report['counts']['trials']} trials: latency against error"

    return _svg(draw, "pareto", (7, 4.5))


def _sensitivity_plot(index: int, kind: str, layers: list[dict[str, Any]]) -> Markup:
    """Horizontal bars of `layers`' measured errors, in the order given (the largest first, on top), grey where the
    layer stayed float, blue where it was quantized (or changed: the passes that leave a layer as it was measure
    no error for it)."""
    from matplotlib.patches import Patch

    decisions = {True: ("float", FLOAT_COLOR), False: ("quantized" if kind == "quant" else "changed", CHANGED_COLOR)}

    def draw(axes) -> str:
        floats = [layer["decision"] == "float" for layer in layers]
        # Positions, not names, place the bars: two layers may share a shortened name.
        axes.barh(range(len(layers)), [layer["error"] for layer in layers],
                  color=[decisions[is_float][1] for is_float in floats])
        axes.set_yticks(range(len(layers)), [_label(layer["layer"]) for layer in layers])
        axes.invert_yaxis()  # the largest on top
        axes.set_xlabel("measured error (what it is: below the table)")
        shown = dict.fromkeys(floats)
        handles = [Patch(color=decisions[is_float][1], label=decisions[is_float][0]) for is_float in shown]
        axes.legend(handles=handles, loc="lower right", fontsize="small")
        return "error per layer"

    return _svg(draw, f"sensitivity-{index}", (7, 1.5 + 0.3 * len(layers)))


def _label(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else "…" + name[-(LABEL_CHARS - 1):]


def _trial_plot(report: dict[str, Any]) -> Markup:
    """Each trial's speed-up as a bar, coloured by its outcome (accepted, on the Pareto front, rejected; a cross
    where a rejected trial was never timed), the winner starred."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    trials = report["trials"]
    front = {row["number"] for row in report["pareto_front"]}
    winner = report.get("winner")

    def outcome(row: dict[str, Any]) -> str:
        return "rejected" if row.get("rejected") else "Pareto front" if row["number"] in front else "accepted"

    def draw(axes) -> str:
        numbers = [row["number"] for row in trials]
        speeds = [row.get("speedup") or 0.0 for row in trials]
        outcomes = [outcome(row) for row in trials]
        axes.bar(numbers, speeds, color=[TRIAL_COLORS[name] for name in outcomes])
        untimed = [row["number"] for row in trials if not row.get("speedup")]
        if untimed:
            axes.scatter(untimed, [0.0] * len(untimed), marker="x", color=TRIAL_COLORS["rejected"], zorder=3,
                         clip_on=False)
        handles = [Patch(color=TRIAL_COLORS[name], label=name) for name in TRIAL_COLORS if name in outcomes]
        if winner:
            speed = next(row.get("speedup") or 0.0 for row in trials if row["number"] == winner["trial"])
            axes.scatter([winner["trial"]], [speed], marker="*", s=240, color="gold", edgecolors="black", zorder=4)
            handles.append(Line2D([], [], marker="*", markersize=14, color="gold", markeredgecolor="black",
                                  linestyle="none", label=f"winner (trial {winner['trial']})"))
        axes.axhline(1.0, color="0.3", linewidth=0.8, linestyle=":")
        handles.append(Line2D([], [], color="0.3", linewidth=0.8, linestyle=":", label="the input"))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("trial")
        axes.set_ylabel("speed against the input (above 1: faster)")
        axes.legend(handles=handles, loc="best", fontsize="small")
        return f"{len(trials)} trials: speed of each"

    return _svg(draw, "trials", (7, 4.5))


def _flat_rows(values: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, value as text) of a dict: lists joined, dicts as JSON, None as an empty cell."""
    rows = []
    for key, value in values.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = json.dumps(value) if value else ""
        rows.append((key, "" if value is None else str(value)))
    return rows


def _change(before: int, after: int) -> str:
    if before == after:
        return "unchanged"
    return f"{(after - before) / before:+.1%}" if before else ""


def _arrow(before: int, after: int, show: Callable[[int], str]) -> str:
    return show(before) if before == after else f"{show(before)} → {show(after)}"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3g} ms" if value < 10 else f"{value:.1f} ms"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _speedup(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    return str(value) if not math.isfinite(value) else f"{value:.{digits}g}"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"
