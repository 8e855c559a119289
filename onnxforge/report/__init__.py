"""Reports a person can read: the JSON report of a run, its terminal summary, and progress display."""

from onnxforge.report.optimization import OptimizationReport, environment, write_json
from onnxforge.report.progress import ProgressPrinter

__all__ = ["OptimizationReport", "ProgressPrinter", "environment", "write_json"]
