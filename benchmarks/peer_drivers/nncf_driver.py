"""NNCF (Intel) post-training quantization of an ONNX model, through its Python API: int8 QDQ.

Modes: `static` (`nncf.quantize` with its defaults over all the calibration feeds), `accuracy`
(`nncf.quantize_with_accuracy_control`: the same, then layers reverted to fp32 until the metric on the held-out feeds
drops by at most --max-drop; the metric is the worst cosine of the first output against fp32's, per held-out feed).
--transformer passes `model_type=nncf.ModelType.TRANSFORMER`, which NNCF's documentation asks for transformers.
"""

from __future__ import annotations

import hashlib
import os

# NNCF sends usage events to Google Analytics unless it believes it runs in CI, the one switch it reads.
os.environ["NNCF_CI"] = "1"

import nncf  # noqa: E402
import onnx  # noqa: E402

from driver_common import first_outputs, load_feeds, make_parser, session, worst_cosine  # noqa: E402


def main() -> None:
    parser = make_parser(("static", "accuracy"), __doc__)
    parser.add_argument("--transformer", action="store_true", help="model_type=nncf.ModelType.TRANSFORMER")
    args = parser.parse_args()
    model = onnx.load(args.model)
    calibration = load_feeds(args.calibration)
    options = {"subset_size": len(calibration), "model_type": nncf.ModelType.TRANSFORMER if args.transformer else None}
    if args.mode == "static":
        quantized = nncf.quantize(model, nncf.Dataset(calibration), **options)
    else:
        held_out = load_feeds(args.held_out)
        pairs = list(zip(held_out, first_outputs(args.model, held_out)))
        last = {}  # NNCF ranks layers by validating one item at a time: one session per model, not per item

        def validate(candidate: onnx.ModelProto, items) -> tuple[float, list[float]]:
            """Worst cosine over the items (feed, fp32 output), and each item's cosine for NNCF's ranking."""
            items = list(items)
            serialized = candidate.SerializeToString()
            digest = hashlib.sha256(serialized).digest()
            if digest not in last:
                last.clear()
                last[digest] = session(serialized)
            outputs = first_outputs(last[digest], [feed for feed, _ in items])
            cosines = [worst_cosine([reference], [output]) for (_, reference), output in zip(items, outputs)]
            return min(cosines), cosines

        quantized = nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(calibration),
            nncf.Dataset(pairs, lambda pair: pair[0]),
            validate,
            max_drop=args.max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            **options,
        )
    onnx.save(quantized, args.out)


if __name__ == "__main__":
    main()
