"""What the peer drivers share: their command line, the feeds they are given, and fp32-vs-candidate agreement.

Run by a peer's own Python (benchmarks/peers.py), so it needs only numpy and onnxruntime, which every peer has.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def make_parser(modes: Sequence[str], description: str) -> argparse.ArgumentParser:
    """MODE MODEL OUT [--calibration NPZ] [--held-out NPZ] [--max-drop X]: the command line of every driver, to which
    a driver may add its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("mode", choices=modes)
    parser.add_argument("model", help="the fp32 ONNX model")
    parser.add_argument("out", help="where to write the tool's model")
    parser.add_argument("--calibration", help="calibration feeds: a stacked .npz (array[i] is sample i) or a folder")
    parser.add_argument("--held-out", help="feeds to judge a candidate on, as --calibration gives them")
    parser.add_argument("--max-drop", type=float, help="the accuracy a budgeted search may lose")
    return parser


def load_feeds(path: str) -> list[dict[str, np.ndarray]]:
    """The feeds of a stacked .npz (each array N x input shape: sample i takes array[i] of every input), or of a
    folder holding one .npz per feed (feeds of different shapes), in file name order."""
    if Path(path).is_dir():
        feeds = []
        for file in sorted(Path(path).glob("*.npz")):
            with np.load(file) as arrays:
                feeds.append({name: arrays[name] for name in arrays.files})
        return feeds
    with np.load(path) as arrays:
        stacked = {name: arrays[name] for name in arrays.files}
    count = len(next(iter(stacked.values())))
    return [{name: array[i] for name, array in stacked.items()} for i in range(count)]


def session(model: str | bytes):
    """An onnxruntime CPU session of a model given as a path or serialized bytes."""
    import onnxruntime

    return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])


def first_outputs(model, feeds: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The model's first output on each feed; `model` is a session, or a path or serialized bytes to make one of."""
    runner = model if hasattr(model, "run") else session(model)
    return [runner.run(None, feed)[0] for feed in feeds]


def worst_cosine(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """The smallest cosine similarity between the flattened outputs of the same feed."""
    cosines = []
    for ref, cand in zip(reference, candidate):
        ref, cand = np.ravel(ref).astype(np.float64), np.ravel(cand).astype(np.float64)
        cosines.append(float(ref @ cand / max(np.linalg.norm(ref) * np.linalg.norm(cand), 1e-30)))
    return min(cosines)
