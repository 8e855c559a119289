"""Greedy-CTC phoneme transcripts and how far two are apart: the hama-asr case's metrics, and `phoneme_agreement`
for onnxforge's error budget:

    optimize asr.onnx --passes quant --data speech/ \
        --budget "metric=benchmarks/metrics/phonemes.py:phoneme_agreement>=0.95" -o asr.int8.onnx

The outputs are those of hama's phoneme recognizer (`log_probs` [batch, time, labels], `out_lengths` [batch]),
whose labels end with the word boundary `<wb>` and the CTC blank `<blank>`. Pure numpy: this file is loaded by
its path, so it imports nothing of the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLANK_BIAS = -0.1  # added to the blank's log-probability before the argmax, as hama's own decoder does


def greedy_ctc(log_probs: np.ndarray, length: int | None = None, blank_bias: float = BLANK_BIAS) -> list[int]:
    """The label ids one utterance's log-probabilities [time, labels] decode to: the best label of each of the
    first `length` frames (the blank's biased by `blank_bias`), repeats collapsed, blanks and word boundaries
    dropped. The blank is the last label and the word boundary the one before it."""
    frames = np.array(log_probs[: frames_count(log_probs, length)], np.float32)
    blank, word_boundary = frames.shape[-1] - 1, frames.shape[-1] - 2
    frames[:, blank] += blank_bias
    best = np.argmax(frames, axis=-1)
    changed = np.concatenate([[True], best[1:] != best[:-1]])
    return [int(label) for label in best[changed] if label not in (blank, word_boundary)]


def frames_count(log_probs: np.ndarray, length: int | None) -> int:
    """How many leading frames hold the utterance: `length`, at most the frames there are (all when None)."""
    return len(log_probs) if length is None else max(0, min(int(length), len(log_probs)))


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance: the fewest substitutions, insertions and deletions turning one sequence into the other."""
    previous = list(range(len(hypothesis) + 1))
    for i, expected in enumerate(reference, start=1):
        current = [i]
        for j, got in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (expected != got)))
        previous = current
    return previous[-1]


def phoneme_error_rate(references: Sequence[Sequence], transcripts: Sequence[Sequence]) -> float:
    """Phoneme error rate over a set of utterances: the edit distances of the transcripts to their references,
    summed, over the references' phonemes in all."""
    edits = sum(edit_distance(reference, transcript) for reference, transcript in zip(references, transcripts))
    return edits / max(sum(len(reference) for reference in references), 1)


def phoneme_agreement(
    reference_outputs: dict[str, np.ndarray], candidate_outputs: dict[str, np.ndarray], sample: dict[str, np.ndarray]
) -> float:
    """1 - (phoneme edit distance / reference phonemes) between the greedy-CTC transcripts of the reference's and
    the candidate's `log_probs` (each cut to its `out_lengths`), pooled over the batch, and at least 0. An empty
    reference transcript scores 1 when the candidate's is empty too, else 0."""
    edits = phonemes = 0
    for index in range(len(reference_outputs["log_probs"])):
        expected = greedy_ctc(reference_outputs["log_probs"][index], reference_outputs["out_lengths"][index])
        got = greedy_ctc(candidate_outputs["log_probs"][index], candidate_outputs["out_lengths"][index])
        edits += edit_distance(expected, got)
        phonemes += len(expected)
    if phonemes == 0:
        return float(edits == 0)
    return max(0.0, 1.0 - edits / phonemes)
