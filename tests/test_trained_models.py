"""Smoke tests of the quantization benchmark's trained cases: the agreement measures, and the VAD case end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import cases  # noqa: E402
from cases.agreement import decisions_unchanged, embedding_cosines, positive_iou, relative_l2  # noqa: E402
from cases.trained_case import TrainedCase, ort_session, save_calibration  # noqa: E402
from sources.english_text import CALIBRATION_COUNT, MORE_SENTENCES, SENTENCES, read_corpus  # noqa: E402

from onnxforge.data import load_samples  # noqa: E402


def test_identical_embeddings_have_cosine_one():
    rng = np.random.default_rng(0)
    embeddings = [rng.standard_normal(384).astype(np.float32) for _ in range(5)]
    np.testing.assert_allclose(embedding_cosines(embeddings, [e.copy() for e in embeddings]), 1.0, atol=1e-12)


def test_cosine_of_orthogonal_and_opposite_embeddings():
    reference = [np.array([1.0, 0.0]), np.array([1.0, 1.0])]
    candidate = [np.array([0.0, 3.0]), np.array([-2.0, -2.0])]
    np.testing.assert_allclose(embedding_cosines(reference, candidate), [0.0, -1.0], atol=1e-12)


def test_decisions_unchanged_counts_flips_across_the_threshold():
    reference = np.array([0.1, 0.6, 0.9, 0.4])
    assert decisions_unchanged(reference, reference, 0.5) == 1.0
    assert decisions_unchanged(reference, np.array([0.2, 0.4, 0.8, 0.6]), 0.5) == 0.5


def test_positive_iou_and_relative_l2_on_known_maps():
    reference = np.array([[0.0, 0.9], [0.8, 0.1]])
    candidate = np.array([[0.0, 0.9], [0.2, 0.7]])  # one text pixel lost, one gained
    assert positive_iou(reference, candidate, 0.3) == pytest.approx(1 / 3)
    assert positive_iou(np.zeros(4), np.zeros(4), 0.3) == 1.0
    assert relative_l2([reference], [reference]) == 0.0
    assert relative_l2([np.array([3.0, 4.0])], [np.array([3.0, 5.0])]) == pytest.approx(0.2)


def test_agreement_lists_the_headline_metric_first(tmp_path):
    case = TrainedCase(
        name="toy",
        description="toy",
        model_path=tmp_path / "toy.onnx",
        calibration=[],
        held_out=[],
        timing_feed={},
        headline="worst",
        metrics={
            "worst": lambda r, c: embedding_cosines(r, c).min(),
            "mean": lambda r, c: embedding_cosines(r, c).mean(),
        },
    )
    result = case.agreement([np.ones(3), np.ones(3)], [np.ones(3), np.array([1.0, 1.0, -1.0])])
    assert list(result) == ["worst", "mean"]
    assert result["worst"] == pytest.approx(1 / 3)
    assert result["mean"] == pytest.approx(2 / 3)


# find_spec, not importorskip: importing silero_vad imports torch and sets its thread count for the whole process.
@pytest.mark.skipif(
    bool(cases.missing_packages("silero-vad")),
    reason=f"not installed: {', '.join(cases.missing_packages('silero-vad'))}",
)
def test_silero_vad_case_streams_and_its_calibration_file_reads_back(tmp_path):
    (case,) = cases.trained_cases(tmp_path, ["silero-vad"])
    assert case.model_path.exists()
    assert case.held_out and case.calibration and case.timing_feed["input"].shape == (1, 576)
    session = ort_session(case.model_path)
    reference = case.evaluate(session)
    assert reference[0].shape == (len(case.held_out),)
    agreement = case.agreement(reference, case.evaluate(session))
    assert list(agreement)[0] == "decisions_unchanged"
    assert agreement["decisions_unchanged"] == 1.0 and agreement["max_probability_difference"] == 0.0
    # Speech and pauses both occur, so the decisions measure something.
    assert 0.2 < agreement["fp32_speech_fraction"] < 0.95
    samples = load_samples(save_calibration(case, tmp_path / "vad.npz"), onnx.load(case.model_path))
    assert len(samples) == len(case.calibration)
    for name in ("input", "state"):
        np.testing.assert_array_equal(samples[7][name], case.calibration[7][name])


def test_the_encoders_extra_calibration_text_repeats_no_sentence_of_its_own():
    """The extra calibration sentences are new text: none is held out (or used twice)."""
    assert len(set(MORE_SENTENCES)) == len(MORE_SENTENCES)
    assert not set(MORE_SENTENCES) & set(SENTENCES)


def test_a_corpus_file_reads_one_sentence_a_line_without_comments_or_blank_lines(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("# a comment\nLet's meet at the café.\n\nIs this seat taken?\n", encoding="utf-8")
    assert read_corpus(corpus) == ("Let's meet at the café.", "Is this seat taken?")


def test_the_english_corpus_holds_out_sentences_after_the_calibration_ones_and_ends_with_the_long_passage():
    assert len(SENTENCES) > CALIBRATION_COUNT
    assert not any(s.startswith("#") for s in SENTENCES + MORE_SENTENCES)
    assert SENTENCES[0].startswith("The museum will be closed on Monday")
    assert SENTENCES[-1].startswith("The lighthouse stood on a bare rock") and len(SENTENCES[-1]) > 300
