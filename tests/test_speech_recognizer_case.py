"""The speech recognizer case's parts that need no recorded speech: the phoneme metric (as onnxforge's error budget
loads it), the reader of the pocketsphinx recordings on a small stand-in, and hama's model widened to float32."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
import wave
from pathlib import Path

import numpy as np
import onnx
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cases  # noqa: E402
from metrics.phonemes import edit_distance, greedy_ctc, phoneme_agreement, phoneme_error_rate  # noqa: E402
from sources.recorded_speech import (  # noqa: E402
    SPEECH_SOURCE_VARIABLE,
    SpeechSourceMissing,
    recorded_utterances,
    speech_source,
)

from onnxforge.pipeline.budget import Budget  # noqa: E402

LABELS = 6  # four phonemes, then the word boundary (4) and the blank (5), as hama lays out its labels


def frames(ids: list[int]) -> np.ndarray:
    """Log-probabilities [frames, LABELS] whose best label in each frame is the given one."""
    log_probs = np.full((len(ids), LABELS), -5.0, np.float32)
    log_probs[np.arange(len(ids)), ids] = -0.01
    return log_probs


def test_greedy_ctc_collapses_repeats_and_drops_blanks_and_word_boundaries():
    assert greedy_ctc(frames([0, 0, 5, 0, 1, 4, 1, 1, 5, 5, 2])) == [0, 0, 1, 1, 2]
    assert greedy_ctc(frames([0, 5, 1, 2]), length=2) == [0]


def test_greedy_ctc_biases_the_blank_down():
    log_probs = np.array([[-1.0, -9, -9, -9, -9, -0.95]], np.float32)  # the blank ahead by 0.05
    assert greedy_ctc(log_probs) == [0]
    assert greedy_ctc(log_probs, blank_bias=0.0) == []


def test_edit_distance_and_pooled_error_rate_on_known_pairs():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2], [1, 2]) == 0
    assert phoneme_error_rate([[1, 2, 3, 4], [5]], [[1, 3, 4], [6]]) == pytest.approx(2 / 5)


def test_phoneme_agreement_counts_the_phonemes_the_candidate_changed():
    reference = {"log_probs": frames([0, 5, 1, 2, 3])[None], "out_lengths": np.array([5])}
    changed = {"log_probs": frames([0, 5, 1, 1, 0])[None], "out_lengths": np.array([5])}  # 1 2 3 -> 1 0
    sample = {"waveform": np.zeros((1, 800), np.float32), "waveform_lengths": np.array([800])}
    assert phoneme_agreement(reference, reference, sample) == 1.0
    assert phoneme_agreement(reference, changed, sample) == pytest.approx(1 - 2 / 4)
    silent = {"log_probs": frames([5, 5])[None], "out_lengths": np.array([2])}
    assert phoneme_agreement(silent, silent, sample) == 1.0
    assert phoneme_agreement(silent, reference, sample) == 0.0


def test_onnxforge_loads_the_metric_file_by_its_path_as_a_budget():
    budget = Budget.parse(f"metric={BENCHMARKS / 'metrics' / 'phonemes.py'}:phoneme_agreement>=0.95")
    reference = [{"log_probs": frames([0, 5, 1, 2])[None], "out_lengths": np.array([4])}]
    changed = [{"log_probs": frames([0, 5, 1, 3])[None], "out_lengths": np.array([4])}]
    samples = [{"waveform": np.zeros((1, 800), np.float32), "waveform_lengths": np.array([800])}]
    assert budget.metric.mean(reference, changed, samples) == pytest.approx(2 / 3)


def _pcm(seconds: float, seed: int) -> bytes:
    samples = np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * 16000))
    return (samples * 32767).astype("<i2").tobytes()


def _wav(seconds: float, seed: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(_pcm(seconds, seed))
    return buffer.getvalue()


def _stand_in_files() -> dict[str, bytes]:
    """test/data of a pocketsphinx source with one LibriVox sentence and one card, a tenth of a second each."""
    files = {
        "librivox/transcription": b"<s> he was not an ill disposed young man </s> (clip-0880)\n",
        "librivox/clip-0880.wav": _wav(0.1, 0),
        "cards/cards.transcription": b"<s> ten of clubs  </s> (001)\n",
        "cards/001.wav": _wav(0.1, 1),
        "forever/input_2_16k.wav": _wav(0.1, 2),
        "forever/input_4_16k.wav": _wav(0.1, 3),
    }
    for index, name in enumerate(("goforward.raw", "numbers.raw", "something.raw", "tidigits/dhd.2934z.raw")):
        files[name] = _pcm(0.1, 10 + index)
    return files


def test_recorded_utterances_read_alike_from_the_tarball_and_the_unpacked_folder(tmp_path):
    files = _stand_in_files()
    tarball = tmp_path / "pocketsphinx-5.1.1.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, data in files.items():
            member = tarfile.TarInfo(f"pocketsphinx-5.1.1/test/data/{name}")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    for name, data in files.items():
        path = tmp_path / "pocketsphinx-5.1.1" / "test" / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    from_tarball, from_folder = recorded_utterances(tarball), recorded_utterances(tmp_path / "pocketsphinx-5.1.1")
    assert [u.name for u in from_tarball] == [u.name for u in from_folder]
    assert [u.text for u in from_tarball[:4]] == [
        "he was not an ill disposed young man",
        "ten of clubs",
        "go forward ten meters",
        "feels like these days go on forever",
    ]
    assert [u.text for u in from_tarball[4:]] == [None] * 4
    for a, b in zip(from_tarball, from_folder):
        assert a.audio.dtype == np.float32 and len(a.audio) == 1600
        np.testing.assert_array_equal(a.audio, b.audio)


def test_the_case_says_how_to_fetch_the_speech_when_it_is_not_there(monkeypatch, tmp_path):
    monkeypatch.delenv(SPEECH_SOURCE_VARIABLE, raising=False)
    with pytest.raises(SpeechSourceMissing, match="pip download --no-deps --no-binary :all: pocketsphinx==5.1.1"):
        speech_source()
    monkeypatch.setenv(SPEECH_SOURCE_VARIABLE, str(tmp_path / "absent.tar.gz"))
    assert any("absent.tar.gz does not exist" in line for line in cases.missing_packages("hama-asr"))


@pytest.mark.skipif(importlib.util.find_spec("hama") is None, reason="not installed: hama")
def test_hama_recognizer_widened_to_float32_reads_like_the_shipped_float16_file(tmp_path):
    from cases.packages import package_dir
    from cases.speech_recognizer import ASR_FILE, recognizer_feed, recognizer_labels, widen_to_float32
    from cases.trained_case import ort_session

    shipped = package_dir("hama") / "assets" / ASR_FILE
    widened = widen_to_float32(onnx.load(shipped))
    tensors = [*widened.graph.initializer]
    tensors += [a.t for n in widened.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    assert not [t.name for t in tensors if t.data_type == onnx.TensorProto.FLOAT16]
    onnx.save(widened, tmp_path / "widened.onnx")
    t = np.arange(16000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * (t > 0.3)).astype(np.float32)
    feed = recognizer_feed(audio + np.random.default_rng(0).normal(0, 0.01, len(audio)).astype(np.float32))
    float16, float32 = (ort_session(path).run(None, feed) for path in (shipped, tmp_path / "widened.onnx"))
    assert float32[0].dtype == np.float32 and float32[0].shape == (1, int(float32[1][0]), len(recognizer_labels()))
    np.testing.assert_array_equal(float32[1], float16[1])
    assert np.mean(float32[0].argmax(-1) == float16[0].argmax(-1)) >= 0.95
