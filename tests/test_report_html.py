"""The HTML report, from real runs: an optimize run (cleanup and quant with --data, timed), quant under a budget
tight enough to measure each layer's sensitivity, and a tiny search, each written by --report PATH.html and by
`onnxforge report` from the run's JSON. The pages are checked for their structure and their escaping (the per-layer
tables against the passes' decisions in the JSON), then opened in headless Chromium (Debian's, through its
chromedriver): no console error, every plot drawn at a size, and a screenshot kept as a test artifact (under
$ONNXFORGE_ARTIFACTS)."""

import copy
import html
import json
import os
import re
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import ONNXFORGE, OPTIMIZE, only_error_line, run_cli, succeeded
from test_search import _mlp

from onnxforge.api import optimize
from onnxforge.data import save_samples
from onnxforge.pipeline import Pass, PassResult, Pipeline
from onnxforge.pipeline.base import LayerDecision
from onnxforge.report import ReportError, render_html

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = "<script>alert(1)</script>"  # a node name, a study name: text from the model file or the user


class _Tags(HTMLParser):
    """How many of each element a page holds, the names of their attributes, and the text of its table cells, in
    a list and row by row."""

    def __init__(self, page: str):
        super().__init__()
        self.count: Counter = Counter()
        self.attributes: set[str] = set()
        self.cells: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.count[tag] += 1
        self.attributes.update(name for name, _ in attrs)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append("".join(self._cell).strip())
            self.rows[-1].append(self.cells[-1])
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _two_layers(path: Path) -> Path:
    """x (N, 32) -> MatMul -> Relu -> MatMul -> y (N, 8); the first MatMul's node name is markup."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W0"], ["h"], name=HOSTILE),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W1"], ["y"], name="head"),
        ],
        "two_layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[
            numpy_helper.from_array((rng.standard_normal((32, 64)) / 6).astype(np.float32), "W0"),
            numpy_helper.from_array((rng.standard_normal((64, 8)) / 8).astype(np.float32), "W1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _samples(path: Path, features: int) -> Path:
    rng = np.random.default_rng(4)
    save_samples(path, [{"x": rng.standard_normal((4, features)).astype(np.float32)} for _ in range(16)])
    return path


@pytest.fixture(scope="module")
def optimize_run(tmp_path_factory) -> SimpleNamespace:
    """optimize --report run.html --json: the page it wrote and the JSON report it printed."""
    folder = tmp_path_factory.mktemp("optimize")
    model, data = _two_layers(folder / "model.onnx"), _samples(folder / "data.npz", 32)
    return _reported_run(folder, "run.html", model, "--passes", "cleanup,quant", "--data", data, "--measure",
                         "-o", folder / "out.onnx")


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> SimpleNamespace:
    """optimize --auto with 2 trials, --report search.html --json, its study named with markup."""
    folder = tmp_path_factory.mktemp("search")
    model, data = _mlp(folder / "mlp.onnx"), _samples(folder / "data.npz", 64)
    # quant's own timed choice is no part of what the page shows: the search times each trial itself.
    return _reported_run(folder, "search.html", model, "--auto", "--passes", "cleanup,quant:measure=false", "--data",
                         data, "--trials", 2, "--min-speedup", 0, "--study", HOSTILE, "-q")


@pytest.fixture(scope="module")
def sensitivity_run(tmp_path_factory) -> SimpleNamespace:
    """quant (untimed) with --data under a budget the whole plan breaks: each layer's sensitivity is measured."""
    folder = tmp_path_factory.mktemp("sensitivity")
    model, data = _two_layers(folder / "model.onnx"), _samples(folder / "data.npz", 32)
    return _reported_run(folder, "run.html", model, "--passes", "quant:measure=false", "--data", data, "--budget",
                         "cosine=0.99995")


def _reported_run(folder: Path, page: str, *arguments) -> SimpleNamespace:
    """optimize ARGUMENTS --report FOLDER/PAGE --json: the page it wrote, and the JSON report it printed (kept
    beside the page) as a file and as data."""
    result = succeeded(run_cli(OPTIMIZE, *arguments, "--report", folder / page, "--json"))
    report = (folder / page).with_suffix(".json")
    report.write_text(result.stdout)
    return SimpleNamespace(folder=folder, page=folder / page, json=report, report=json.loads(result.stdout))


def _layer_tables(page: str) -> list[list[list[str]]]:
    """The rows of each per-layer table of an optimize page, its header first."""
    section = page.split("<h2>Per layer</h2>")[1].split("<h2>")[0]
    return [_Tags(table).rows for table in section.split("<table>")[1:]]


def _layer_rows(record: dict) -> list[list[str]]:
    """The rows a pass record's decisions per layer make: layer, decision, why and, where any was measured, error."""
    layers = record["layers"]
    measured = any(layer["error"] is not None for layer in layers)
    return [[layer["layer"], layer["decision"], layer["why"],
             *([f"{layer['error']:.3g}" if layer["error"] is not None else ""] if measured else [])]
            for layer in layers]


def _measures_layers(report: dict) -> bool:
    return any(layer["error"] is not None for record in report["passes"] for layer in record.get("layers", []))


def _fetches_nothing(page: str) -> bool:
    """No element of the page loads anything from elsewhere: no script at all, no src or href but data: or #."""
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.IGNORECASE)
    return "<script" not in page.lower() and all(ref.startswith(("data:", "#")) for ref in references)


def test_the_optimize_page_shows_the_pipeline_the_layers_and_the_plots(optimize_run):
    page = optimize_run.page.read_text()
    tags = _Tags(page)
    # time per pass; latency before and after; each layer's error if the default budget had quant measure it
    plots = 2 + _measures_layers(optimize_run.report)
    assert tags.count["svg"] == plots and tags.count["figure"] == plots
    assert tags.count["table"] >= 6  # before/after, errors, pipeline, per layer, decisions, verification, machine
    quant = optimize_run.report["passes"][1]
    assert [optimize_run.report["passes"][0]["name"], quant["name"]] == ["cleanup", "quant"]
    for heading in ("Before and after", "Pipeline", "Per layer", "Measured decisions", "Verification"):
        assert f"<h2>{heading}</h2>" in page
    # quant's per-layer table, row for row its decisions in the JSON: each MatMul with the precision it got (timed:
    # int8 or float, either way a row)
    (table,) = _layer_tables(page)
    assert table[0][:3] == ["layer", "precision", "why"] and table[1:] == _layer_rows(quant)
    assert [row[0] for row in table[1:]] == [f"MatMul {HOSTILE}", "MatMul head"]
    for row in table[1:]:
        assert row[1] == "float" or row[1].startswith("int8"), row
    cells = tags.cells
    assert "4 of 16 --data samples, held out from calibration" in cells
    assert any(cell.startswith("latency, median") for cell in cells)
    # The node name is text on the page, nowhere markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert _fetches_nothing(page)


def test_the_search_page_shows_every_trial_the_front_and_the_winner(search_run):
    report, page = search_run.report, search_run.page.read_text()
    tags = _Tags(page)
    assert tags.count["svg"] == 2 and "Pareto front" in page  # the front, and a bar per trial
    winner = report["winner"]["trial"]
    assert f"winner (trial {winner}, as confirmed)" in page  # the front's legend
    # The trial bars: their legend names each outcome the trials had, and the winner.
    bars = next(svg for svg in page.split("<svg")[1:] if f"{len(report['trials'])} trials: speed of each" in svg)
    front = {row["number"] for row in report["pareto_front"]}
    outcomes = {"rejected" if row["rejected"] else "Pareto front" if row["number"] in front else "accepted"
                for row in report["trials"]}
    assert f"winner (trial {winner})" in bars and all(outcome in bars for outcome in outcomes)
    trials = page.split("<h2>Trials</h2>")[1].split("<h2>Space</h2>")[0]
    assert _Tags(trials).count["tr"] == 1 + len(report["trials"])
    assert "confirmed: timed again against the input" in tags.cells
    for heading in ("Winner", "Trials", "Space", "Setup"):
        assert f"<h2>{heading}</h2>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the study's name, in the subtitle and the setup
    assert _fetches_nothing(page)


@pytest.mark.parametrize("run", ["optimize_run", "sensitivity_run", "search_run"])
def test_onnxforge_report_renders_the_json_as_the_run_rendered_its_page(run, request, tmp_path):
    written = request.getfixturevalue(run)
    page = tmp_path / "again.htm"
    succeeded(run_cli(ONNXFORGE, "report", written.json, "-o", page))
    assert page.read_bytes() == written.page.read_bytes()  # the same report draws the same page, plots included


def test_the_per_layer_tables_of_prune_lowrank_and_quant(tmp_path):
    """Each lossy pass's decisions per layer in a real run, row for row the "layers" of its record in the JSON; the
    output error lowrank measured per layer on --data is a column and a plot."""
    model, data = _mlp(tmp_path / "mlp.onnx"), _samples(tmp_path / "data.npz", 64)
    page = tmp_path / "run.html"
    passes = "prune:measure=false:ratio=0.3,lowrank:ratio=0.5,quant:measure=false"
    result = succeeded(run_cli(OPTIMIZE, model, "--passes", passes, "--data", data, "--budget", "none", "--report",
                               page, "--json", "-q"))
    records = json.loads(result.stdout)["passes"]
    text = page.read_text()
    tables = _layer_tables(text)
    assert [table[0] for table in tables] == [["layer", "kept", "why"], ["layer", "rank", "why", "error"],
                                              ["layer", "precision", "why"]]
    assert [table[1:] for table in tables] == [_layer_rows(record) for record in records]
    prune, lowrank, quant = ([row[1] for row in table[1:]] for table in tables)
    assert "184 of 256 channels" in prune and "all 10 channels" in prune  # the group feeding the output stays whole
    assert any(re.fullmatch(r"rank \d+ of \d+", rank) for rank in lowrank)
    assert quant and all(precision.startswith("int8") for precision in quant)
    # lowrank's plot: a bar per factored layer, with what its error is said under the table
    factored = [layer for layer in records[1]["layers"] if layer["error"] is not None]
    assert factored and _Tags(text).count["svg"] == 2  # time per pass; lowrank's error per layer
    assert f"error: {factored[0]['error_text']}" in html.unescape(text)
    assert "relative output error" in factored[0]["error_text"]


def test_the_sensitivity_quant_measured_is_a_column_and_a_plot(sensitivity_run):
    """Under a budget the whole plan breaks, quant measures each layer's share of it quantized alone: the table
    shows it beside the decision, and a plot draws it, largest on top."""
    page = sensitivity_run.page.read_text()
    quant = sensitivity_run.report["passes"][0]
    assert [layer["error"] is not None for layer in quant["layers"]] == [True, True]
    assert all(layer["error_text"].startswith("share of the budget (cosine>=0.99995)") for layer in quant["layers"])
    (table,) = _layer_tables(page)
    assert table[0] == ["layer", "precision", "why", "error"] and table[1:] == _layer_rows(quant)
    svgs = page.split("<svg")[1:]
    assert len(svgs) == 2  # time per pass; error per layer
    plot = next(svg for svg in svgs if "error per layer" in svg)
    largest = max(quant["layers"], key=lambda layer: layer["error"])
    smallest = min(quant["layers"], key=lambda layer: layer["error"])
    labels = [html.escape(layer["layer"], quote=False) for layer in (largest, smallest)]
    assert plot.index(labels[0]) < plot.index(labels[1])  # sorted: the largest first, drawn on top
    assert "float" in plot  # the legend: the most sensitive layer stays float


def test_nothing_a_report_holds_becomes_markup(optimize_run):
    """Every string the optimize page shows, made hostile, stays text: in elements and in attributes."""
    report = copy.deepcopy(optimize_run.report)
    attribute = 'x" onmouseover="alert(1)'
    report["source"] = report["output"] = HOSTILE
    report["warnings"] = [HOSTILE]
    for record in report["passes"]:
        record.update(name=HOSTILE, status=attribute, error=HOSTILE, budget=HOSTILE, notes=[HOSTILE, *record["notes"]])
        record["layers"] = [dict.fromkeys(("layer", "decision", "why", "error_text"), HOSTILE) | {"error": 0.5}]
    report["decisions"]["values"] = {HOSTILE: HOSTILE}
    report["environment"]["processor"] = HOSTILE
    page = render_html(report)
    assert "<script" not in page and "onmouseover" not in _Tags(page).attributes
    assert page.count("&lt;script&gt;") >= 12


class _Decides(Pass):
    """Changes nothing; tells what it decided for two layers, having measured an error for one."""

    name = "decides"

    def run(self, model, ctx) -> PassResult:
        return PassResult(False, layers=[LayerDecision("MatMul head", "float", "too sensitive", 0.25, "its share"),
                                         LayerDecision(f"MatMul {HOSTILE}", "int8", "fast enough")])


def test_a_pass_s_decisions_per_layer_reach_the_json_report_and_its_page(tmp_path):
    """PassResult.layers become the record's "layers" in the JSON (a pipeline's members' too), absent where a pass
    has none; the page draws a table of them, with the measured error as a column and a plot."""
    model = _two_layers(tmp_path / "model.onnx")
    _, report = optimize(model, [_Decides(), Pipeline([_Decides()]), "cleanup"], budget=None)
    records = json.loads(json.dumps(report.to_dict()))["passes"]
    decided = [
        {"layer": "MatMul head", "decision": "float", "why": "too sensitive", "error": 0.25, "error_text": "its share"},
        {"layer": f"MatMul {HOSTILE}", "decision": "int8", "why": "fast enough", "error": None, "error_text": ""},
    ]
    assert records[0]["layers"] == records[1]["layers"] == decided
    assert "layers" not in records[2]
    page = render_html(report.to_dict())
    tables = _layer_tables(page)
    assert [table[0] for table in tables] == [["layer", "decision", "why", "error"]] * 2
    assert all(table[1:] == [["MatMul head", "float", "too sensitive", "0.25"],
                             [f"MatMul {HOSTILE}", "int8", "fast enough", ""]] for table in tables)
    assert page.count("error per layer") == 2 and "error: its share" in page
    assert "<script" not in page


def test_what_is_not_a_report_is_refused():
    for payload in ({}, [], {"model": "m.onnx", "latency": {}}):
        with pytest.raises(ReportError, match="not an onnxforge report"):
            render_html(payload)


def test_the_report_command_fails_on_one_error_line(optimize_run, tmp_path):
    out = tmp_path / "page.html"
    assert "no report at" in only_error_line(run_cli(ONNXFORGE, "report", tmp_path / "missing.json", "-o", out))
    (tmp_path / "text.json").write_text("not json\n")
    assert "is not a JSON report" in only_error_line(run_cli(ONNXFORGE, "report", tmp_path / "text.json", "-o", out))
    (tmp_path / "bench.json").write_text(json.dumps({"model": "m.onnx", "latency": {"median_ms": 1.0}}))
    refused = only_error_line(run_cli(ONNXFORGE, "report", tmp_path / "bench.json", "-o", out))
    assert "is not an onnxforge report" in refused
    same = only_error_line(run_cli(ONNXFORGE, "report", optimize_run.json, "-o", optimize_run.json))
    assert "inputs are never modified" in same
    assert not out.exists()


def test_a_json_report_path_still_writes_json(tmp_path):
    model = _two_layers(tmp_path / "model.onnx")
    succeeded(run_cli(OPTIMIZE, model, "--report", tmp_path / "run.report", "-q"))
    assert json.loads((tmp_path / "run.report").read_text())["passes"][0]["name"] == "cleanup"


@pytest.fixture
def artifacts(tmp_path) -> Path:
    """Where the browser test keeps its screenshots and pages: $ONNXFORGE_ARTIFACTS (CI sets it), else tmp_path."""
    folder = Path(os.environ.get("ONNXFORGE_ARTIFACTS") or tmp_path) / "report_html"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _chromium(user_data: Path):
    """Headless Chromium through Debian's chromedriver, with the console kept; no connection leaves it."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"no {CHROMIUM} or {CHROMEDRIVER}: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={user_data}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_the_pages_open_in_headless_chromium_with_their_plots_drawn(
    optimize_run, sensitivity_run, search_run, artifacts, tmp_path
):
    browser = _chromium(tmp_path / "profile")
    from selenium.webdriver.common.by import By

    try:
        for name, run, plots in (("optimize", optimize_run, 2 + _measures_layers(optimize_run.report)),
                                 ("sensitivity", sensitivity_run, 2), ("search", search_run, 2)):
            shutil.copy(run.page, artifacts / f"{name}.html")
            browser.get(run.page.as_uri())
            assert browser.title.startswith("onnxforge")
            svgs = browser.find_elements(By.CSS_SELECTOR, "figure.plot svg")
            assert len(svgs) == plots
            for svg in svgs:
                assert svg.size["width"] > 100 and svg.size["height"] > 100, svg.size
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(1280, height)  # the whole page in the screenshot
            screenshot = artifacts / f"{name}.png"
            assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
            severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
            assert not severe, severe
    finally:
        browser.quit()
