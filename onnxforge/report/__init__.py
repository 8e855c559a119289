"""Reports a person can read: the JSON report of a run, its terminal summary, its HTML page, and progress display."""

from onnxforge.report.html import ReportError, render_html, save_html
from onnxforge.report.optimization import OptimizationReport, environment, write_json
from onnxforge.report.progress import ProgressPrinter

__all__ = [
    "OptimizationReport", "ProgressPrinter", "ReportError", "environment", "render_html", "save_html", "write_json",
]
