"""The `hama-asr` case: the phoneme recognizer of the hama package (16 kHz waveform in, CTC phoneme log-probabilities
out), its float16 weights and arithmetic widened to float32, on recorded English speech; judged by its phoneme error
rate against the phonemes of the known text (hama's own G2P) and by the phonemes of fp32's transcripts it keeps."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from cases.packages import package_dir, package_version
from cases.trained_case import Feed, TrainedCase, ort_session
from metrics.phonemes import greedy_ctc, phoneme_error_rate
from sources.recorded_speech import POCKETSPHINX_VERSION, SAMPLE_RATE, recorded_utterances, speech_source

ASR_FILE = "asr_waveform_fp16.onnx"
# Judged on the five LibriVox sentences (read prose, one reader) and two card names; the other recordings calibrate.
HELD_OUT = ("librivox/", "cards/002.wav", "cards/005.wav")
TIMING_UTTERANCE = "librivox/sense_and_sensibility_01_austen_64kb-0890.wav"  # 5.3 s
# The widened copy must transcribe as the shipped float16 file does, up to rounding on a few frames.
WIDENED_MIN_AGREEMENT = 0.98


@dataclass
class SpeechRecognizerCase(TrainedCase):
    """A CTC phoneme recognizer judged by its transcripts: `evaluate` gives each held-out utterance's
    log-probabilities [frames, labels] over the frames its `out_lengths` counts."""

    def evaluate(self, session) -> list[np.ndarray]:
        results = []
        for feed in self.held_out:
            log_probs, lengths = session.run(["log_probs", "out_lengths"], feed)
            results.append(log_probs[0][: int(lengths[0])])
        return results


def speech_recognizer_case(work_dir: Path) -> SpeechRecognizerCase:
    """hama's waveform phoneme recognizer, widened to float32 and cached in `work_dir`, on the recordings of the
    pocketsphinx source distribution named by $ONNXFORGE_SPEECH_SOURCE (SpeechSourceMissing when it is not set)."""
    utterances = recorded_utterances(speech_source())
    held_out = [u for u in utterances if u.name.startswith(HELD_OUT)]
    calibration = [u for u in utterances if not u.name.startswith(HELD_OUT)]
    path = work_dir / "hama-asr.onnx"
    if not path.exists():
        _write_widened(package_dir("hama") / "assets" / ASR_FILE, path, [recognizer_feed(u.audio) for u in utterances])
    labels = recognizer_labels()
    expected = text_phonemes([u.text for u in held_out])

    def error_rate(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
        return phoneme_error_rate(expected, [[labels[i] for i in greedy_ctc(c)] for c in candidate])

    def agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
        return 1.0 - phoneme_error_rate([greedy_ctc(r) for r in reference], [greedy_ctc(c) for c in candidate])

    held_seconds, calibration_seconds = (
        sum(len(u.audio) for u in part) / SAMPLE_RATE for part in (held_out, calibration)
    )
    return SpeechRecognizerCase(
        name="hama-asr",
        description=(
            f"hama {package_version('hama')} waveform phoneme recognizer (STFT as Conv and log-mel in the graph, a "
            f"stride-2 conv stem, 11 depthwise-separable conv blocks with squeeze-excitation, 2 attention layers, 256 "
            f"wide, CTC over {len(labels)} labels), file hama/assets/{ASR_FILE} with its float16 weights and "
            f"arithmetic widened to float32; inputs waveform 1xsamples (16 kHz) and waveform_lengths, each utterance "
            f"at its own length, outputs log_probs 1xframesx{len(labels)} (50 frames a second) and out_lengths, read "
            f"by greedy CTC (blank bias -0.1); speech: recordings of the pocketsphinx {POCKETSPHINX_VERSION} source "
            f"distribution, {len(held_out)} held out ({held_seconds:.0f} s: five LibriVox sentences of Sense and "
            f"Sensibility, two spoken card names; reference phonemes from hama's G2P of their text), "
            f"{len(calibration)} others calibrate ({calibration_seconds:.0f} s: card names, short sentences, digits)"
        ),
        model_path=path,
        calibration=[recognizer_feed(u.audio) for u in calibration],
        held_out=[recognizer_feed(u.audio) for u in held_out],
        timing_feed=recognizer_feed(next(u.audio for u in held_out if u.name == TIMING_UTTERANCE)),
        headline="phoneme_error_rate",
        metrics={"phoneme_error_rate": error_rate, "phonemes_agree": agreement},
    )


def recognizer_feed(audio: np.ndarray) -> Feed:
    """The recognizer's inputs for one 16 kHz utterance: the waveform 1xsamples and its length."""
    return {"waveform": audio[None].astype(np.float32), "waveform_lengths": np.array([len(audio)], np.int64)}


def recognizer_labels() -> list[str]:
    """What each of the recognizer's output labels is: hama's phoneme vocabulary, then `<wb>` and `<blank>`."""
    vocab = json.loads((package_dir("hama") / "assets" / "g2p_vocab.json").read_text(encoding="utf-8"))
    return [*vocab["decoder"], "<wb>", "<blank>"]


def text_phonemes(texts: Sequence[str]) -> list[list[str]]:
    """The phonemes of each English text, as hama's G2P model (shipped in the same wheel) spells them."""
    import hama

    g2p = hama.G2PModel()
    return [[alignment.phoneme for alignment in g2p.predict(text).alignments] for text in texts]


def widen_to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float16 weight and constant stored as float32, and its casts to float16 casting to
    float32 instead: the same graph computed in float32."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            raise ValueError(f"{node.name}: subgraphs are not widened")
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT16:
                attribute.i = onnx.TensorProto.FLOAT
    for tensor in tensors:
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model


def _write_widened(source: Path, path: Path, feeds: list[Feed]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(widen_to_float32(onnx.load(source)), tmp)
    shipped, widened = ort_session(source), ort_session(tmp)
    transcripts = [[greedy_ctc(*_outputs(session, feed)) for feed in feeds] for session in (shipped, widened)]
    agreement = 1.0 - phoneme_error_rate(*transcripts)
    if agreement < WIDENED_MIN_AGREEMENT:
        raise RuntimeError(
            f"the float32 copy of {source.name} transcribes differently: phoneme agreement {agreement:.4f}"
        )
    tmp.replace(path)


def _outputs(session, feed: Feed) -> tuple[np.ndarray, int]:
    log_probs, lengths = session.run(["log_probs", "out_lengths"], feed)
    return log_probs[0], int(lengths[0])
