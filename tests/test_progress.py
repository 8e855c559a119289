"""Progress people can watch: bars on a terminal (rich), throttled plain lines elsewhere, nothing with -q; the long
steps (calibration, distillation, timing) report their counts."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_checks import constant, make_model, value_info

from onnxforge import optimize
from onnxforge.measure import InterleavedTiming, MeasureOptions, interleaved_latency, measure_latency, timing_progress
from onnxforge.pipeline import Instrument, Pass, PassContext, PassResult
from onnxforge.report.progress import ProgressDisplay, ProgressPrinter, progress_display

OPTIMIZE = [sys.executable, "-c", "import sys; from onnxforge.cli import optimize_main; sys.exit(optimize_main())"]
# The plugin that gives the command line the pass below.
PLUGIN = f"""import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from onnxforge.pipeline import register_pass
from test_progress import Steps
register_pass("test-steps")(Steps)
"""


class Steps(Pass):
    """Reports `steps` steps of a loop with a loss, `pause` seconds apart, and changes nothing."""

    name = "test-steps"
    lossless = True

    @dataclass
    class Options:
        steps: int = 300
        pause: float = 0.0

    def run(self, model, ctx):
        for step in range(1, self.options.steps + 1):
            time.sleep(self.options.pause)
            ctx.progress(f"test step {step}/{self.options.steps} loss {1 / step:.4g}")
        return PassResult(changed=False)


class Lines(Instrument):
    """Keeps every progress line of a run."""

    def __init__(self):
        self.lines: list[str] = []

    def progress(self, line: str) -> None:
        self.lines.append(line)


def _files(tmp_path: Path) -> tuple[Path, Path]:
    """A one-MatMul model file and the plugin file that registers test-steps."""
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])
    onnx.save(make_model([node], [value_info("x", [2, 4])], [value_info("y", [2, 3])], [constant("w", weight)]),
              tmp_path / "m.onnx")  # fmt: skip
    (tmp_path / "steps_plugin.py").write_text(PLUGIN)
    return tmp_path / "m.onnx", tmp_path / "steps_plugin.py"


def _optimize(tmp_path: Path, passes: str, *flags: str) -> list[str]:
    model, plugin = _files(tmp_path)
    return [*OPTIMIZE, str(model), "--plugin", str(plugin), "--passes", passes, "-o", str(tmp_path / "out.onnx"),
            *flags]  # fmt: skip


def test_plain_lines_show_a_pass_of_many_quick_steps_as_its_one_line(tmp_path):
    run = subprocess.run(_optimize(tmp_path, "test-steps:steps=300"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith("[1/1] test-steps ... unchanged (")


def test_plain_lines_show_a_long_loop_every_interval_and_its_end():
    printed = io.StringIO()
    source = make_model([onnx.helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [2])], [value_info("y", [2])])
    with ProgressPrinter(printed, interval=0.1) as printer:
        optimize(source, [Steps(steps=40, pause=0.01)], instruments=[printer], verify=False)
    lines = printed.getvalue().splitlines()
    steps = [line for line in lines if "test step" in line]
    head = "[1/1] test-steps:steps=40:pause=0.01 ... "
    assert lines[0] == head and lines[-1].startswith(head + "unchanged (")
    assert 2 <= len(steps) <= 10, lines  # about every 0.1 s of 0.4, never a line per step
    assert steps[-1] == "    test step 40/40 loss 0.025"


def test_plain_lines_hold_back_steps_only():
    printed = io.StringIO()
    printer = ProgressPrinter(printed, interval=3600)
    printer.line("calibration 3/10")
    printer.line("block 1/3: distill step 4/10 loss 0.5")
    printer.line("step 40/300: loss 0.1, held-out error 0.2")  # a check: a line of its own
    printer.line("search: study 's', 12 candidates, up to 5 trials")
    assert printed.getvalue().splitlines() == [
        "step 40/300: loss 0.1, held-out error 0.2", "search: study 's', 12 candidates, up to 5 trials"
    ]


def test_quiet_shows_nothing(tmp_path):
    run = subprocess.run(_optimize(tmp_path, "test-steps:steps=50:pause=0.01", "-q"), capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    assert type(progress_display(quiet=True)) is ProgressDisplay


def test_on_a_terminal_rich_draws_the_bars_and_the_run_succeeds(tmp_path):
    terminal, stderr = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    process = subprocess.Popen(
        _optimize(tmp_path, "test-steps:steps=60:pause=0.02"), stdout=subprocess.PIPE, stderr=stderr, env=env
    )
    os.close(stderr)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # EIO: the command has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    stdout = process.communicate(timeout=120)[0].decode()
    os.close(terminal)
    text = shown.decode(errors="replace")
    assert process.returncode == 0, text
    assert "\x1b[" in text and "━" in text and "test step" in text, text  # rich's control codes and its bar
    assert "[1/1] test-steps:steps=60:pause=0.02 ... unchanged (" in text
    assert "test-steps" in stdout and "\x1b[" not in stdout  # the summary, on stdout, without the bars


def test_calibration_reports_each_sample():
    weight = np.ones((4, 3), np.float32)
    model = make_model([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], [value_info("x", [2, 4])],
                       [value_info("y", [2, 3])], [constant("w", weight)])  # fmt: skip
    from onnxforge.calibration.statistics import channel_moments
    from onnxforge.ir import load_model

    samples = [{"x": np.full((2, 4), float(i), np.float32)} for i in range(5)]
    context, lines = PassContext(data=samples), []
    context.on_progress = lines.append
    channel_moments(load_model(model), {"x": -1}, samples, context.calibration)
    assert lines == [f"calibration {i}/5" for i in range(1, 6)]


def test_distillation_reports_each_step_with_its_loss():
    pytest.importorskip("torch")
    from test_distill import PRUNE, _deep_mlp, _samples

    lines = Lines()
    optimize(_deep_mlp(), f"{PRUNE},distill:steps=12:batch=2", data=_samples(16), budget="none", seed=0,
             instruments=[lines])  # fmt: skip
    steps = [line for line in lines.lines if line.startswith("distill step")]
    assert [line.split(" loss ")[0] for line in steps] == [f"distill step {i}/12" for i in range(1, 13)]
    assert all(float(line.split(" loss ")[1]) >= 0 for line in steps)


def test_timings_report_between_rounds_to_whoever_listens():
    lines: list[str] = []
    with timing_progress(lines.append):
        measure_latency(lambda: time.sleep(0.005), MeasureOptions(warmup=0, min_repeats=1, min_time_s=0.7))
        interleaved_latency([lambda: None, lambda: None], InterleavedTiming(blocks=3, block_s=0.001))
    runs = [line.removeprefix("timing run ").split("/") for line in lines if line.startswith("timing run")]
    assert len(runs) >= 2 and runs[-1][0] == runs[-1][1]  # every half second of runs, and the end
    assert lines[-3:] == ["timing round 1/3", "timing round 2/3", "timing round 3/3"]
