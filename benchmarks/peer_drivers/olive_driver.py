"""Microsoft Olive on an ONNX model for CPU, run in this process with its telemetry off.

Modes: `auto` (its command line `olive auto-opt --precision int8 --device cpu --provider CPUExecutionProvider`: for
an ONNX model that is OnnxPeepholeOptimizer, OrtTransformersOptimization and OnnxDynamicQuantization), `static` (a
workflow of OnnxPeepholeOptimizer then OnnxStaticQuantization at its defaults: QDQ, int8, MinMax over the
calibration feeds; `olive optimize --precision int8` would calibrate on a Hugging Face dataset instead).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["OLIVE_DISABLE_TELEMETRY"] = "1"  # it would post events to Microsoft

import onnx  # noqa: E402
from olive.cli.launcher import main as olive_cli  # noqa: E402
from olive.data.registry import Registry  # noqa: E402
from olive.workflows import run as run_workflow  # noqa: E402

from driver_common import load_feeds, make_parser  # noqa: E402


@Registry.register_dataset()
def onnxforge_feeds(path: str) -> list:
    """The feeds of a stacked .npz as Olive's dataset items: (feed, label), no label needed here."""
    return [(feed, 0) for feed in load_feeds(path)]


def main() -> None:
    args = make_parser(("auto", "static"), __doc__).parse_args()
    with tempfile.TemporaryDirectory() as work:
        output = Path(work) / "output"
        if args.mode == "auto":
            command = ["auto-opt", "-m", args.model, "--precision", "int8", "--device", "cpu"]
            command += ["--provider", "CPUExecutionProvider", "-o", str(output)]
            olive_cli(command, called_as_console_script=False)
        else:
            data = {
                "name": "calibration",
                "type": "DataContainer",
                "load_dataset_config": {"type": "onnxforge_feeds", "params": {"path": args.calibration}},
                "dataloader_config": {"type": "no_auto_batch_dataloader"},  # each feed already has its batch axis
            }
            passes = {
                "peephole": {"type": "OnnxPeepholeOptimizer"},
                "quantize": {"type": "OnnxStaticQuantization", "data_config": "calibration"},
            }
            run_workflow({
                "input_model": {"type": "ONNXModel", "model_path": args.model},
                "systems": {"local": {
                    "type": "LocalSystem",
                    "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
                }},
                "data_configs": [data],
                "passes": passes,
                "host": "local",
                "target": "local",
                "output_dir": str(output),
                "cache_dir": str(Path(work) / "cache"),
            })
        if not (output / "model.onnx").exists():  # Olive logs a failed pass and carries on
            raise SystemExit("Olive produced no model (its log above says why)")
        # One self-contained file, whether Olive kept the weights inside or beside the model.
        onnx.save(onnx.load(output / "model.onnx"), args.out)


if __name__ == "__main__":
    main()
