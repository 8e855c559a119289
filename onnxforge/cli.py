"""The `optimize` and `onnxforge` commands: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import operator
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from onnxforge.errors import OnnxforgeError
from onnxforge.limits import DEFAULT_EXECUTION_TIMEOUT_S, run_time_limit
from onnxforge.stop_signals import StopOnSignals, Terminated, stop_exception

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_IMPROVEMENT = 3  # optimize --auto --require-improvement found nothing faster inside the budget
EXIT_CONDITION_HOLDS = 4  # optimize --fail-if: a condition held on the run's figures; nothing was written
EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shell's convention: 128 + the signal's number
EXIT_TERMINATED = 128 + signal.SIGTERM

OPTIMIZE_EXIT_CODES = f"""exit codes (docs/build-pipelines.md):
  0    done (--json: status ok or unchanged)
  {EXIT_ERROR}    an error (the model, --config, --data, a pass with --on-error stop): nothing was written
  {EXIT_USAGE}    a usage error: a bad flag or value, a --fail-if the run cannot test
  {EXIT_NO_IMPROVEMENT}    --auto --require-improvement: nothing faster than the input inside the budget
  {EXIT_CONDITION_HOLDS}    a --fail-if condition holds: nothing was written
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); {EXIT_TERMINATED}: terminated (SIGTERM); nothing was written
"""


class UsageError(OnnxforgeError):
    """Options that do not fit together, found once the command line is parsed: exit 2, as a bad flag."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one `error:` line."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `onnxforge`: optimize, bench, compare, search-worker, report, list-passes."""
    failure_json = _FailureJson()

    def command() -> int:
        parser = _Parser(prog="onnxforge", description="Optimize, benchmark and compare ONNX models.")
        _add_version_argument(parser)
        commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
        _add_optimize_arguments(
            commands.add_parser(
                "optimize", help="run passes on a model", epilog=OPTIMIZE_EXIT_CODES,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
        _add_bench_arguments(commands.add_parser("bench", help="measure a model's latency on a backend"))
        _add_compare_arguments(commands.add_parser("compare", help="compare two models' outputs"))
        _add_worker_arguments(
            commands.add_parser("search-worker", help="run trials of an optimize --auto search that shares its storage")
        )
        _add_report_arguments(
            commands.add_parser("report", help="render the JSON report of optimize (or optimize --auto) as HTML")
        )
        list_parser = commands.add_parser("list-passes", help="list the available passes")
        list_parser.add_argument("--plugin", action="append", default=[], help="module or .py file with passes")
        args = parser.parse_args(argv)
        failure_json.args = args
        handlers = {
            "optimize": _optimize, "bench": _bench, "compare": _compare, "search-worker": _search_worker,
            "report": _report, "list-passes": _list_passes,
        }
        return _within_timeout(handlers[args.command], args)

    return _guarded(command, failure_json.write)


def optimize_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `optimize` (the same as `onnxforge optimize`)."""
    failure_json = _FailureJson()

    def command() -> int:
        parser = _Parser(
            prog="optimize", description="Run optimization passes on an ONNX model.", epilog=OPTIMIZE_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_optimize_arguments(parser)
        failure_json.args = parser.parse_args(argv)
        return _within_timeout(_optimize, failure_json.args)

    return _guarded(command, failure_json.write)


class _FailureJson:
    """The JSON object `optimize --json` prints on stdout for a run that ends in an error (its error line goes to
    stderr as always): once the command line is parsed, every --json run prints one."""

    def __init__(self) -> None:
        self.args: argparse.Namespace | None = None

    def write(self, exit_code: int, message: str) -> None:
        if self.args is not None and getattr(self.args, "json_stdout", False):
            _print_json({"status": "failed", "exit_code": exit_code, "input": self.args.model, "output": None,
                         "error": message})


def _print_json(payload: dict) -> None:
    """Write `payload` on stdout as the --report JSON is written."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _add_version_argument(parser: argparse.ArgumentParser) -> None:
    try:
        version = metadata.version("onnxforge")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from onnxforge import __version__ as version
    parser.add_argument("--version", action="version", version=f"onnxforge {version}")


def _within_timeout(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's handler within its --timeout, if it has one."""
    with run_time_limit(getattr(args, "timeout", None), exit_code_if_stuck=EXIT_ERROR):
        return handler(args)


def _guarded(command: Callable[[], int], on_failure: Callable[[int, str], None] | None = None) -> int:
    """Run a command; user errors and signals become one `error:` line and a non-zero exit, which `on_failure`
    (exit code, message) is told of."""
    stop = StopOnSignals()  # first: a signal while the heavy modules load is reported like any other
    try:
        with stop.held():
            _import_runtime()
        return command()
    except BaseException as exc:
        stop.stopping = True  # the run is over: no signal may cut its error line short
        if _out_of_memory(exc):
            # The traceback keeps every frame's objects (the model) alive: free them before writing anything.
            exc.__traceback__ = None
            del exc
            gc.collect()
            exit_code, message = EXIT_ERROR, OUT_OF_MEMORY
        else:
            # Whatever the exception became on its way up, when a signal arrived it is what ended the run.
            exit_code, message = _failure(exc if stop.received is None else stop_exception(stop.received))
        sys.stderr.write(f"error: {message}\n")
        if on_failure is not None:
            on_failure(exit_code, message)
        return exit_code
    finally:
        stop.restore()


OUT_OF_MEMORY = (
    "out of memory: the run needed more than this process may use (its limit, e.g. `ulimit -d`, or the "
    "machine's memory); raise the limit or run on a larger machine"
)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised while handling, a MemoryError."""
    seen = 0
    while exc is not None and seen < 100:
        if isinstance(exc, MemoryError):
            return True
        exc, seen = exc.__context__ or exc.__cause__, seen + 1
    return False


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit code for `exc` and the message of its one `error:` line; raise what is not ours to report."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED, "terminated"
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    # OSError: a path the user gave cannot be read or written (permissions, full disk, ...)
    if isinstance(exc, (OnnxforgeError, OSError)):
        return EXIT_ERROR, str(exc)
    if isinstance(exc, Exception) and not os.environ.get("ONNXFORGE_DEBUG"):  # a bug of ours: still one line
        return EXIT_ERROR, f"internal error: {type(exc).__name__}: {exc} (set ONNXFORGE_DEBUG=1 for details)"
    raise exc  # SystemExit (usage errors, --help), or a bug's traceback on request


def _import_runtime() -> None:
    """Import the modules with C extensions every command needs, and quiet onnxruntime's and graphsurgeon's own
    logging (we report their failures as one line). Run with signals held: an exception raised while a C
    extension initialises comes out as a printed traceback and an ImportError, not as the interrupt."""
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnx_graphsurgeon
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    # graphsurgeon prints its own line before raising on a malformed graph: the error line is ours to write.
    onnx_graphsurgeon.logger.G_LOGGER.severity = onnx_graphsurgeon.logger.G_LOGGER.CRITICAL + 1


def _number_type(kind: type, minimum: float, expected: str, above: bool = False) -> Callable[[str], float]:
    """An argparse `type=`: the text as `kind`, finite and at least `minimum` (above it, with `above`), else a
    usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


_tolerance = _number_type(float, 0, "a finite number, 0 or more")
_seconds_or_zero = _number_type(float, 0, "a finite number of seconds, 0 or more")
_count = _number_type(int, 1, "a whole number, 1 or more")
_count_or_zero = _number_type(int, 0, "a whole number, 0 or more")
_seconds = _number_type(float, 0, "a finite number of seconds above 0", above=True)


def _duration(text: str) -> float:
    """An argparse `type=`: "90", "90s", "20m", "1.5h" as seconds above 0, else a usage error."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    try:
        return _seconds(number) * unit
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a duration above 0 such as 90s, 20m or 1h, got {text!r}") from None


# --fail-if's figures, read from the run's report, each with what measures it when not every run does.
_MEASURED_BY_MEASURE = "--measure (or measure = true in --config)"
_MEASURED_BY_COMPARING = "verification (drop --no-verify) or --data"
_FIGURES = {
    "latency_ratio": _MEASURED_BY_MEASURE,  # median latency after / before
    "speedup": _MEASURED_BY_MEASURE,  # median latency before / after
    "size_ratio": None,  # weights bytes after / before
    "cosine": _MEASURED_BY_COMPARING,  # the worst output's cosine similarity to the original's
    "max_rel": _MEASURED_BY_COMPARING,  # the largest relative error of any output against the original's
}
_OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_CONDITION = re.compile(r"\s*(\w+)\s*(<=|>=|<|>)\s*(\S+?)\s*")


@dataclass(frozen=True)
class _Condition:
    """A --fail-if condition: `figure operator bound`, e.g. latency_ratio>1.0."""

    figure: str
    operator: str
    bound: float
    text: str  # as given, without spaces: what the messages quote

    def holds(self, value: float) -> bool:
        return _OPERATORS[self.operator](value, self.bound)


def _condition(text: str) -> _Condition:
    """An argparse `type=`: a --fail-if condition, else a usage error naming the figures it may test."""
    figures = ", ".join(_FIGURES)
    match = _CONDITION.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"write a condition as FIGURE<BOUND, e.g. cosine<0.99 (operators <, <=, >, "
                                         f">=; figures: {figures}), got {text!r}")
    figure, comparison, bound = match.groups()
    if figure not in _FIGURES:
        raise argparse.ArgumentTypeError(f"unknown figure {figure!r} in {text!r} (known: {figures})")
    try:
        value = float(bound)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the bound of {text!r} must be a finite number, got {bound!r}")
    return _Condition(figure, comparison, value, f"{figure}{comparison}{bound}")


def _add_model_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=DIMS",
        help="fix an input's shape, e.g. x=1x3x224x224 (for dynamic dims)",
    )
    parser.add_argument(
        "--data", metavar="PATH", help="sample inputs: .npz named after the model inputs, or a folder of them"
    )


def _add_optimize_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that a --config file can fill what the command line leaves out.
    parser.add_argument("model", nargs="?", help="input ONNX model (never modified)")
    parser.add_argument("--passes", help="pass list, e.g. cleanup or prune:ratio=0.3,quant:bits=4 (default cleanup)")
    parser.add_argument("-o", "--output", help="where to write the optimized model")
    parser.add_argument(
        "--report", metavar="PATH", help="write the report here: a self-contained HTML page for .html/.htm, else JSON"
    )
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file with any of these options")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective config (--config merged with the flags) as a JSON config file and exit",
    )
    parser.add_argument("--list-passes", action="store_true", help="list the available passes and exit")
    _add_version_argument(parser)
    parser.add_argument("--plugin", action="append", default=[], help="module or .py file that registers passes")
    parser.add_argument("--on-error", choices=["rollback", "stop"], help="when a pass fails (default rollback)")
    parser.add_argument("--no-verify", action="store_true", help="skip checking each pass (faster, unsafe)")
    parser.add_argument(
        "--budget",
        metavar="BOUNDS",
        help="how far lossy passes may move the outputs, on held-out --data samples (else random inputs): "
        "cosine=0.99, labels=, top1=, rel=, equal=, metric=FILE.py:FUNCTION>=BOUND, or none (default "
        "cosine=0.99,labels=0.99)",
    )
    parser.add_argument("--rtol", type=_tolerance, help="tolerance for lossless passes (default 1e-4)")
    parser.add_argument("--seed", type=int, help="seed of the random verification inputs")
    parser.add_argument(
        "--decisions",
        metavar="REPORT",
        help="replay the measured decisions (and seed) of the run that wrote this --report, instead of timing",
    )
    parser.add_argument("--measure", action="store_true", default=None, help="time the model before and after")
    parser.add_argument("--backend", help="backend for verification and timing (default ort)")
    parser.add_argument("--target", help="target device (default cpu)")
    parser.add_argument("--threads", type=_count, help="threads for timing (default: the backend's)")
    parser.add_argument(
        "--external-data", choices=["auto", "yes", "no"], help="store weights beside the model (default auto)"
    )
    parser.add_argument("--explain", action="store_true", help="print why each pass changed what it changed")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument(
        "--json",
        dest="json_stdout",
        action="store_true",
        help="print one JSON object on stdout: the report with status and exit_code (other text goes to stderr)",
    )
    parser.add_argument(
        "--fail-if",
        type=_condition,
        action="append",
        default=[],
        metavar="CONDITION",
        help=f"exit {EXIT_CONDITION_HOLDS} writing nothing when this holds after the run, e.g. 'latency_ratio>1.0' "
        f"or 'cosine<0.99' (quote it; operators <, <=, >, >=; figures: {', '.join(_FIGURES)}); repeatable",
    )
    parser.add_argument(
        "--pass-timeout", type=_seconds, metavar="SECONDS", help="roll back a pass (with its checks) that takes longer"
    )
    _add_timeout_argument(parser)
    _add_model_input_arguments(parser)
    _add_compile_arguments(parser)
    _add_search_arguments(parser)


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("search (--auto)")
    group.add_argument(
        "--auto",
        action="store_true",
        help="search passes, their options and session settings for the fastest model inside --budget, timing each "
        "candidate on --backend/--target; --passes then lists what the search may use (docs/search.md)",
    )
    group.add_argument("--trials", type=_count, help="finished trials the search holds in all (default 50)")
    group.add_argument("--time-limit", type=_duration, metavar="DURATION", help="stop trials after this long (20m, 90s)")
    group.add_argument("--storage", metavar="URL", help="the search's storage: sqlite:///FILE, a file, postgresql://...")
    group.add_argument("--study", metavar="NAME", help="the search's name in --storage (default: from the options)")
    group.add_argument("--sampler", choices=["auto", "tpe", "nsga2", "grid", "random"], help="default auto")
    group.add_argument("--plot", metavar="PATH", help="draw the trials, their Pareto front and the winner (.svg, .png)")
    group.add_argument(
        "--min-speedup",
        type=_tolerance,
        help="how much faster than the input the winner must be, timed again at the end (default 1.02)",
    )
    group.add_argument(
        "--require-improvement",
        action="store_true",
        help=f"exit {EXIT_NO_IMPROVEMENT} when nothing faster than the input stays inside the budget",
    )


def _add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", required=True, metavar="URL", help="the search's storage (as optimize --auto)")
    parser.add_argument("--study", required=True, metavar="NAME", help="the search's study name")
    parser.add_argument("--model", metavar="PATH", help="this machine's copy of the model (default: the study's path)")
    parser.add_argument("--data", metavar="PATH", help="this machine's copy of --data (default: the study's path)")
    parser.add_argument("--time-limit", type=_duration, metavar="DURATION", help="stop taking trials after this long")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    _add_timeout_argument(parser)


def _add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="stop the whole run after this long: one error line, nothing written (without it, each single "
        f"model execution still stops after {DEFAULT_EXECUTION_TIMEOUT_S:g} s)",
    )


def _add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of backends that compile ahead of time (tvm): tuning, the exported artifact, remote runs."""
    parser.add_argument("--artifact", metavar="PATH", help="also export the compiled model here (a .so; tvm)")
    parser.add_argument("--tune", metavar="trials=N", help="tune with this trial budget (tvm MetaSchedule)")
    parser.add_argument(
        "--tune-records", metavar="DIR",
        help="tuning records folder (default ~/.cache/onnxforge); without --tune, compile with its records, tuning nothing",
    )
    parser.add_argument("--rpc", metavar="HOST:PORT:KEY", help="run and time on a server of this RPC tracker (tvm)")


def _backend_settings(args: argparse.Namespace) -> dict[str, str]:
    """The backend's own settings (BackendOptions.extra) from --tune, --tune-records and --rpc."""
    settings = {}
    if args.tune:
        key, _, value = args.tune.partition("=")
        if key != "trials" or not value:
            raise OnnxforgeError(f"--tune takes trials=N, got {args.tune!r}")
        settings["tune_trials"] = value
    if args.tune_records:
        settings["tune_records"] = args.tune_records
    if args.rpc:
        settings["rpc"] = args.rpc
    return settings


def _tuning_progress(args: argparse.Namespace, display):
    """Where tuning reports progress: the progress display, when tuning was asked for and output is not quiet."""
    if not args.tune or getattr(args, "quiet", False):
        return None
    return lambda line: display.line(f"tuning: {line}")


EXTERNAL_DATA = {"auto": None, "yes": True, "no": False}  # --external-data: stage_model's external_data

OPTIMIZE_DEFAULTS = {
    "passes": "cleanup",
    "on_error": "rollback",
    "rtol": 1e-4,
    "backend": "ort",
    "target": "cpu",
    "external_data": "auto",
    "measure": False,
}


def _optimize_settings(args: argparse.Namespace) -> dict:
    """Merge command line, --config file and defaults, in that order of precedence."""
    from onnxforge.config import PipelineConfig, load_config
    from onnxforge.data import parse_shape_overrides
    from onnxforge.pipeline.budget import DEFAULT_BUDGET

    config = load_config(args.config) if args.config else PipelineConfig()
    names = ("passes", "output", "report", "data", "budget", "on_error", "rtol", "seed", "measure", "backend")
    names += ("target",)
    settings = {}
    for name in (*names, "threads", "external_data"):
        given = getattr(args, name)
        settings[name] = given if given is not None else getattr(config, name)
        if settings[name] is None and not (name == "passes" and args.auto):  # a search's passes default is its own
            settings[name] = OPTIMIZE_DEFAULTS.get(name)
    settings["budget"] = settings["budget"] or DEFAULT_BUDGET
    settings["verify"] = False if args.no_verify else config.verify is not False
    settings["plugins"] = [*(config.plugins or []), *args.plugin]
    settings["shapes"] = {**(config.shapes or {}), **parse_shape_overrides(args.shape)}
    settings["decisions"] = args.decisions if args.decisions is not None else config.decisions
    return settings


def _optimize(args: argparse.Namespace) -> int:
    """optimize: list the passes, print the effective config, or run (once, or a search with --auto); with --json,
    what people read goes to stderr and stdout holds the run's JSON object alone."""
    if args.list_passes:
        return _list_passes(args)
    settings = _optimize_settings(args)
    if args.print_config:
        from onnxforge.config import PipelineConfig, dump_config

        sys.stdout.write(dump_config(PipelineConfig(**settings)))
        return 0
    if not args.model:
        raise OnnxforgeError("no input model given (optimize MODEL --passes ... -o OUT)")
    _check_conditions_measured(args, settings)
    run = _optimize_auto if args.auto else _optimize_once
    if not args.json_stdout:
        return run(args, settings)[0]
    with contextlib.redirect_stdout(sys.stderr):  # a plugin's or a library's print too
        exit_code, payload = run(args, settings)
    _print_json(payload)
    return exit_code


def _check_conditions_measured(args: argparse.Namespace, settings: dict) -> None:
    """Refuse, before any work, a --fail-if condition on a figure the run will not measure."""
    if args.fail_if and args.auto:
        raise UsageError("--fail-if tests the figures of a run without --auto; --require-improvement gates a search")
    measured = {
        None: True,
        _MEASURED_BY_MEASURE: settings["measure"],
        _MEASURED_BY_COMPARING: settings["verify"] or bool(settings["data"]),
    }
    for condition in args.fail_if:
        if not measured[_FIGURES[condition.figure]]:
            raise UsageError(
                f"--fail-if {condition.text}: this run does not measure {condition.figure}; "
                f"{_FIGURES[condition.figure]} measures it"
            )


def _optimize_once(args: argparse.Namespace, settings: dict) -> tuple[int, dict]:
    """optimize without --auto: run the passes, then write the model, its artifact and the report all at once, or
    nothing when a --fail-if condition holds. Returns the exit code and the --json object."""
    from onnxforge.api import compile_model, optimize
    from onnxforge.backends.base import BackendOptions
    from onnxforge.frontends import ModelFile
    from onnxforge.ir.io import stage_model
    from onnxforge.ir.output_set import OutputSet, check_output_paths
    from onnxforge.report.progress import progress_display

    output, report_path, external = settings.pop("output"), settings.pop("report"), settings.pop("external_data")
    progress = progress_display(args.quiet)  # as a context: a pass stopped midway does not leave its line open
    # Loaded once, here: it names the weights files, which no output may replace.
    with progress.loading(args.model):
        model_file = ModelFile.load(args.model)
    inputs = _input_files({"the input model": (args.model, model_file.model)}, settings["data"])
    if isinstance(settings["decisions"], str):
        inputs["the --decisions report"] = [Path(settings["decisions"])]
    check_output_paths(
        inputs,
        {"-o": output, "-o's weights file": output and f"{output}.data", "--report": report_path,
         **_artifact_outputs(args.artifact)},
    )  # fmt: skip
    backend_settings = _backend_settings(args)
    with OutputSet(inputs=[path for paths in inputs.values() for path in paths]) as written, progress:
        model, report = optimize(
            model_file,
            instruments=[progress],
            backend_settings=backend_settings,
            pass_timeout=args.pass_timeout,
            **settings,
        )
        figures = _figures(report)
        verdicts = _verdicts(args.fail_if, figures)
        holding = [verdict for verdict in verdicts if verdict["holds"]]
        if not holding:
            if output:
                stage_model(model, output, written, external_data=EXTERNAL_DATA[external])
                report.output = output
            if args.artifact:
                options = BackendOptions(target=settings["target"], threads=settings["threads"], extra=backend_settings)
                compiled = compile_model(
                    model, settings["backend"], options, settings["shapes"], _tuning_progress(args, progress)
                )
                report.artifact = _stage_artifact(compiled, args.artifact, written)
            if report_path:
                _write_report(report_path, report.to_dict(), written)
            written.commit()
    if not args.quiet:
        for warning in report.warnings():
            print(f"warning: {warning}", file=sys.stderr)
        print(report.summary())
        if not output:
            print("  (no -o given: the optimized model was not saved)")
        if report.artifact:
            print(f"  compiled for {settings['backend']} {settings['target']}: {', '.join(report.artifact)}")
    if args.explain:
        print(report.explanation())
    exit_code, status = 0, "ok" if any(record.status == "applied" for record in report.passes) else "unchanged"
    if holding:
        failed = "; ".join(f"--fail-if {v['condition']} holds: {v['figure']}={v['value']:.6g}" for v in holding)
        sys.stderr.write(f"error: {failed}\n")
        exit_code, status = EXIT_CONDITION_HOLDS, "failed"
    payload = {"status": status, "exit_code": exit_code, "input": args.model, "figures": figures, "fail_if": verdicts}
    return exit_code, {**payload, **report.to_dict()}


def _figures(report) -> dict[str, float | None]:
    """The figures --fail-if tests and --json prints, from the run's report; None where the run measured none. The
    errors are those on the held-out --data samples when there are samples, else on the random inputs."""
    before, after = report.latency_before, report.latency_after
    error = report.data_error if report.data_error is not None else report.error
    return {
        "latency_ratio": after.median_ms / before.median_ms if before and after and before.median_ms > 0 else None,
        "speedup": report.speedup,
        "size_ratio": report.after.bytes / report.before.bytes if report.before.bytes else None,
        "cosine": error.min_cosine if error is not None else None,
        "max_rel": error.max_rel if error is not None else None,
    }


def _verdicts(conditions: list[_Condition], figures: dict[str, float | None]) -> list[dict]:
    """Each --fail-if condition with its figure's value and whether it holds. A figure the run was set to measure
    can still have no value on a model (the cosine of integer outputs, the size of a model without weights): the
    condition cannot be tested, a usage error."""
    verdicts = []
    for condition in conditions:
        value = figures[condition.figure]
        if value is None:
            raise UsageError(
                f"--fail-if {condition.text}: this model gives no {condition.figure} to test; nothing was written"
            )
        verdicts.append(
            {"condition": condition.text, "figure": condition.figure, "value": value, "holds": condition.holds(value)}
        )
    return verdicts


def _input_files(models: dict, data: str | None) -> dict[str, list[Path]]:
    """The files a run reads, by what they are: each model (what -> (path, loaded Model)), its weights files,
    and the --data samples (the file, or every file in the folder)."""
    files: dict[str, list[Path]] = {}
    for what, (path, model) in models.items():
        files[what] = [Path(path)]
        files[f"a weights file of {what}"] = sorted(model.external_data_files())
    if data:
        samples = Path(data)
        files["a --data file"] = sorted(samples.iterdir()) if samples.is_dir() else [samples]
    return files


def _artifact_outputs(artifact: str | None) -> dict[str, str | Path | None]:
    """--artifact and the description the export writes beside it (tvm: the .json next to the .so)."""
    return {"--artifact": artifact, "--artifact's description": artifact and Path(artifact).with_suffix(".json")}


def _stage_artifact(compiled, artifact: str, written) -> list[str]:
    """Export `compiled` as files of the OutputSet `written`; returns the paths they will have once committed."""
    target = Path(artifact)
    files = compiled.export(written.stage_folder(target.parent) / target.name)
    return [str(target.with_name(Path(file).name)) for file in files]


def _optimize_auto(args: argparse.Namespace, settings: dict) -> tuple[int, dict]:
    """optimize --auto: search, then write the winner (or the input unchanged), its config, its session settings
    and the search report, all at once. Returns the exit code and the --json object."""
    from onnxforge.frontends import ModelFile
    from onnxforge.ir.io import stage_model
    from onnxforge.ir.output_set import OutputSet, check_output_paths
    from onnxforge.report import write_json
    from onnxforge.report.progress import progress_display
    from onnxforge.report.search_plot import save_search_plot
    from onnxforge.search import search

    output, report_path = settings["output"], settings["report"]
    progress = progress_display(args.quiet)
    with progress.loading(args.model):
        model_file = ModelFile.load(args.model)
    inputs = _input_files({"the input model": (args.model, model_file.model)}, settings["data"])
    beside = Path(output or report_path or "").with_suffix("") if (output or report_path) else None
    config_path = output and f"{beside}.config.json"
    session_path = f"{beside}.session.json" if output and settings["backend"] == "ort" else None
    storage = args.storage or (beside and f"sqlite:///{Path(f'{beside}.search.db').resolve()}")
    check_output_paths(
        inputs,
        {"-o": output, "-o's weights file": output and f"{output}.data", "--report": report_path,
         "the winner's config": config_path, "the winner's session settings": session_path,
         "the search's storage": storage[len("sqlite:///"):] if storage and storage.startswith("sqlite:///") else None,
         "--plot": args.plot},
    )  # fmt: skip
    if storage and not args.storage:  # the default storage beside the outputs: their folder may not exist yet
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    quiet = args.quiet
    with progress:
        result = search(
            model_file,
            data=settings["data"],
            budget=settings["budget"],
            passes=settings["passes"],
            backend=settings["backend"],
            target=settings["target"],
            shapes=settings["shapes"],
            backend_settings=_backend_settings(args),
            trials=args.trials or 50,
            time_limit=args.time_limit,
            storage=storage,
            study=args.study,
            sampler_name=args.sampler or "auto",
            seed=settings["seed"] or 0,
            **({"min_speedup": args.min_speedup} if args.min_speedup is not None else {}),
            progress=progress.line,
        )
    with OutputSet(inputs=[path for paths in inputs.values() for path in paths]) as written:
        if output:
            stage_model(result.model, output, written, external_data=EXTERNAL_DATA[settings["external_data"]])
        if config_path and result.config:
            write_json(config_path, result.config, written)
        if session_path and result.session:
            write_json(session_path, {"onnxruntime.SessionOptions": result.session}, written)
        if report_path:
            _write_report(report_path, result.report, written)
        if args.plot:
            save_search_plot(result.report, args.plot, written)
        written.commit()
    if not quiet:
        print(result.summary())
        if output and result.config:
            print(f"  wrote {output}, {config_path} (optimize MODEL --config {config_path} rebuilds it)"
                  + (f", {session_path}" if session_path else ""))
    if args.explain:
        print(result.explanation())
    exit_code, status = 0, "ok" if result.improved else "unchanged"
    if args.require_improvement and not result.improved:
        sys.stderr.write(f"error: no improvement: {result.message}\n")
        exit_code, status = EXIT_NO_IMPROVEMENT, "failed"
    payload = {"status": status, "exit_code": exit_code, "input": args.model, "output": output}
    return exit_code, {**payload, "improved": result.improved, **result.report}


def _search_worker(args: argparse.Namespace) -> int:
    from onnxforge.report.progress import progress_display
    from onnxforge.search import search_worker

    with progress_display(args.quiet) as progress:
        finished = search_worker(
            args.storage, args.study, model=args.model, data=args.data, time_limit=args.time_limit,
            progress=progress.line,
        )
    if not args.quiet:
        print(f"search-worker: {finished} trials finished here")
    return 0


def _write_report(path: str, report: dict, written) -> None:
    """Stage `report` in the OutputSet `written`: the HTML page for a path ending .html or .htm, else the JSON."""
    from onnxforge.report import write_json
    from onnxforge.report.html import HTML_SUFFIXES, save_html

    if Path(path).suffix.lower() in HTML_SUFFIXES:
        save_html(report, path, written)
    else:
        write_json(path, report, written)


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", help="a JSON report that optimize --report wrote (with or without --auto)")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="where to write the HTML page")


def _report(args: argparse.Namespace) -> int:
    from onnxforge.ir.output_set import check_output_paths
    from onnxforge.report.html import read_report, save_html

    report = read_report(args.report)
    check_output_paths({"the JSON report": [Path(args.report)]}, {"-o": args.output})
    save_html(report, args.output)
    return 0


def _list_passes(args: argparse.Namespace) -> int:
    from onnxforge.pipeline import available_passes, load_plugin

    for plugin in args.plugin:
        load_plugin(plugin)
    passes = available_passes()
    width = max(len(name) for name in passes)
    for name, cls in passes.items():
        kind = "lossless" if cls.lossless else "lossy"
        print(f"{name:<{width}}  {kind:<8}  {cls.summary()}")
    return 0


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model to time")
    parser.add_argument("--backend", default="ort", help="backend (default ort)")
    parser.add_argument("--target", default="cpu", help="target device (default cpu)")
    parser.add_argument("--threads", type=_count, help="intra-op threads (default: the backend's)")
    parser.add_argument(
        "--opt-level",
        choices=["disable", "basic", "extended", "all"],
        default="all",
        help="backend graph optimization level (default all)",
    )
    parser.add_argument("--warmup", type=_count_or_zero, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--repeats", type=_count, default=20, help="at least this many timed runs (default 20)")
    parser.add_argument(
        "--min-time", type=_seconds_or_zero, default=1.0, help="and at least this many seconds (default 1)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the statistics as JSON")
    parser.add_argument("--compile-only", action="store_true", help="compile (and export) without running (tvm)")
    _add_timeout_argument(parser)
    _add_model_input_arguments(parser)
    _add_compile_arguments(parser)


def _bench(args: argparse.Namespace) -> int:
    from onnxforge.frontends import from_onnx
    from onnxforge.ir.output_set import OutputSet, check_output_paths
    from onnxforge.report.progress import progress_display

    progress = progress_display()
    with progress.loading(args.model):
        model = from_onnx(args.model)
    files = _input_files({"the input model": (args.model, model)}, args.data)
    check_output_paths(files, {"--json": args.json, **_artifact_outputs(args.artifact)})
    with OutputSet(inputs=[path for paths in files.values() for path in paths]) as written:
        _bench_into(args, model, written, progress)
        written.commit()
    return 0


def _bench_into(args: argparse.Namespace, model, written, progress) -> None:
    """Time (or only compile) `model` as `bench` does, its artifact and --json staged in the OutputSet `written`;
    tuning and timing report to the display `progress`, which has ended before anything is printed."""
    from onnxforge.api import compile_model, for_backend, measure_model
    from onnxforge.backends import get_backend
    from onnxforge.backends.base import BackendOptions
    from onnxforge.data import parse_shape_overrides
    from onnxforge.measure import MeasureOptions
    from onnxforge.report import environment, write_json

    settings = _backend_settings(args)  # a usage error, before the backend is loaded
    if not args.data:  # samples give the shapes themselves
        model = for_backend(model, args.backend, parse_shape_overrides(args.shape))
    options = BackendOptions(
        target=args.target, threads=args.threads, graph_optimization=args.opt_level, extra=settings
    )
    backend = get_backend(args.backend)
    # A backend that compiles for static shapes has them from --shape; another can run the model to find dims.
    prepared = None if backend.capabilities.static_shapes else backend.prepare(model, options)
    inputs = _inputs(args, model, run=prepared and prepared.run)[0]
    if args.compile_only:
        shapes = {name: list(value.shape) for name, value in inputs.items()}
        with progress:
            compiled = compile_model(model, args.backend, options, shapes, _tuning_progress(args, progress))
        files = _stage_artifact(compiled, args.artifact, written) if args.artifact else []
        print(f"{args.model}: compiled for {args.backend} {args.target}" + (f": {', '.join(files)}"
                                                                             if files else " (no --artifact)"))
        return
    measure = MeasureOptions(warmup=args.warmup, min_repeats=args.repeats, min_time_s=args.min_time)
    artifact = written.stage_folder(Path(args.artifact).parent) / Path(args.artifact).name if args.artifact else None
    with progress:
        stats = measure_model(model, inputs, args.backend, options, measure, artifact, _tuning_progress(args, progress))
    print(
        f"{args.model}: {args.backend} {args.target}  median {stats.median_ms:.3f} ms  p90 {stats.p90_ms:.3f} ms  "
        f"min {stats.min_ms:.3f} ms  max {stats.max_ms:.3f} ms  spread {stats.spread * 100:.1f}%  "
        f"({stats.repeats} runs after {stats.warmup} warm-up)"
    )
    if args.json:
        write_json(
            args.json,
            {
                "model": args.model,
                "backend": args.backend,
                "target": args.target,
                "threads": args.threads,
                "opt_level": args.opt_level,
                "latency": stats.to_dict(),
                "environment": environment(),
            },
            written,
        )


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="the reference model (usually the original)")
    parser.add_argument("candidate", help="the model to check against it")
    parser.add_argument("--samples", type=_count, default=4, help="random input sets when no --data (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--backend", default="ort", help="backend that runs both (default ort)")
    parser.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    _add_timeout_argument(parser)
    _add_model_input_arguments(parser)


def _compare(args: argparse.Namespace) -> int:
    from onnxforge.backends import get_backend
    from onnxforge.frontends import from_onnx
    from onnxforge.ir.output_set import check_output_paths
    from onnxforge.report import write_json
    from onnxforge.comparison import compare_outputs

    reference = from_onnx(args.reference)
    candidate = from_onnx(args.candidate)
    models = {"the reference model": (args.reference, reference), "the candidate model": (args.candidate, candidate)}
    check_output_paths(_input_files(models, args.data), {"--json": args.json})
    backend = get_backend(args.backend)
    ref_runner, cand_runner = backend.prepare(reference), backend.prepare(candidate)
    samples = _inputs(args, reference, count=args.samples, run=ref_runner.run)
    comparison = compare_outputs([ref_runner.run(s) for s in samples], [cand_runner.run(s) for s in samples])
    print(f"{len(samples)} input sets ({'--data' if args.data else 'random'}):")
    for out in comparison.outputs:
        line = f"  {out.name}: max abs {out.max_abs:.4g}  max rel {out.max_rel:.4g}"
        if out.cosine is not None:
            line += f"  cosine {out.cosine:.6f}"
        if out.top1_agreement is not None:
            line += f"  top-1 agreement {out.top1_agreement * 100:.2f}%"
        if out.mismatch_fraction is not None:
            line += f"  mismatched {out.mismatch_fraction * 100:.2f}%"
        if out.shape_mismatch:
            line += "  SHAPES DIFFER"
        print(line)
    if args.json:
        write_json(args.json, comparison.to_dict())
    return 0


def _inputs(args: argparse.Namespace, model, count: int = 1, run=None) -> list[dict]:
    """The feeds of bench and compare: every --data sample, else `count` random feeds of --shape and, given `run`
    (runs the model once), of the dynamic dims the model runs with, found as optimize finds them."""
    from onnxforge.data import load_samples, parse_shape_overrides
    from onnxforge.feeds import Feeds
    from onnxforge.ir.shapes import skeleton_proto

    proto = skeleton_proto(model)
    if args.data:
        return load_samples(args.data, proto)
    feeds = Feeds(shapes=parse_shape_overrides(args.shape))
    if run is not None:
        feeds.resolve(proto, run)
    return feeds.inputs(proto, count, getattr(args, "seed", 0))


if __name__ == "__main__":
    sys.exit(main())
