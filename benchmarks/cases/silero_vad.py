"""The `silero-vad` case: the recurrent speech detector of the silero-vad package, streamed chunk by chunk over a
minute of synthesized speech with pauses and background noise, judged by the fraction of speech decisions
unchanged."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cases.agreement import decisions_unchanged, max_abs_difference
from cases.packages import package_dir, package_version
from cases.trained_case import TrainedCase, ort_session
from sources.english_text import CALIBRATION_COUNT, SENTENCES
from sources.speech import SAMPLE_RATE, espeak_version, speech_stream

VAD_FILE = "silero_vad_openvino_16k.onnx"  # no If/sr branch, static 1x576: the fastest of its files in onnxruntime
VAD_RATE = SAMPLE_RATE  # the speech source's 16 kHz, the rate this model file takes
VAD_CHUNK = 512  # new samples per call at 16 kHz
VAD_CONTEXT = 64  # samples of the previous chunk prepended, as silero_vad's OnnxWrapper does
VAD_THRESHOLD = 0.5
VAD_EVAL_SECONDS = 60.0
VAD_CALIBRATION_SECONDS = 20.0


@dataclass
class VadCase(TrainedCase):
    """A streaming VAD judged on one stream: each session threads its own LSTM state from chunk to chunk."""

    def evaluate(self, session) -> list[np.ndarray]:
        return [stream_vad(session, [feed["input"] for feed in self.held_out])[0]]


def stream_vad(session, chunks: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run the VAD over consecutive chunks from a zero state; return the speech probabilities and the state fed
    to each chunk."""
    state = np.zeros((2, 1, 128), np.float32)
    probabilities, states = [], []
    for chunk in chunks:
        states.append(state)
        probability, state = session.run(None, {"input": chunk, "state": state})
        probabilities.append(float(probability.ravel()[0]))
    return np.asarray(probabilities, np.float32), states


def vad_chunks(audio: np.ndarray) -> list[np.ndarray]:
    """Cut 16 kHz audio into the VAD's 1x576 inputs: 64 samples of context, then 512 new ones (rest dropped)."""
    padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), audio.astype(np.float32)])
    count = len(audio) // VAD_CHUNK
    return [padded[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CONTEXT + VAD_CHUNK][None, :] for i in range(count)]


def silero_vad_case(work_dir: Path) -> VadCase:
    """Silero VAD 16 kHz, streamed over a minute of speech with pauses and noise; calibrated on another stretch."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("the silero-vad case speaks its audio with espeak-ng: apt-get install espeak-ng")
    source = package_dir("silero_vad") / "data" / VAD_FILE
    path = work_dir / "silero-vad.onnx"
    if not path.exists():
        shutil.copyfile(source, path)
    held_out = [s for s in SENTENCES[CALIBRATION_COUNT:] if len(s) < 300]  # no long passage
    order = np.random.default_rng(7).permutation(len(held_out))
    evaluation = speech_stream([held_out[i] for i in order], VAD_EVAL_SECONDS, seed=1)
    calibration_audio = speech_stream(list(SENTENCES[:CALIBRATION_COUNT]), VAD_CALIBRATION_SECONDS, seed=2)
    session = ort_session(path)
    eval_chunks = vad_chunks(evaluation)
    _, eval_states = stream_vad(session, eval_chunks)
    calibration_chunks = vad_chunks(calibration_audio)
    _, calibration_states = stream_vad(session, calibration_chunks)
    return VadCase(
        name="silero-vad",
        description=(
            f"Silero VAD (recurrent: conv front end + LSTM) from pip package silero-vad "
            f"{package_version('silero-vad')}, file silero_vad/data/{VAD_FILE}; input 1x{VAD_CONTEXT + VAD_CHUNK} "
            f"(64 samples of context + 512 new at 16 kHz) and LSTM state 2x1x128, threaded chunk to chunk; audio: "
            f"English sentences spoken by espeak-ng {espeak_version()} (5 voices, varied rate, pitch and loudness), "
            f"resampled to 16 kHz, with 0.4-3 s pauses and background noise, {len(eval_chunks) * VAD_CHUNK / VAD_RATE:.0f} s held out "
            f"({len(eval_chunks)} chunks), {len(calibration_chunks) * VAD_CHUNK / VAD_RATE:.0f} s of other sentences "
            f"calibrate (state from the fp32 stream)"
        ),
        model_path=path,
        calibration=[{"input": c, "state": s} for c, s in zip(calibration_chunks, calibration_states)],
        held_out=[{"input": c, "state": s} for c, s in zip(eval_chunks, eval_states)],
        timing_feed={"input": eval_chunks[len(eval_chunks) // 3], "state": eval_states[len(eval_chunks) // 3]},
        headline="decisions_unchanged",
        metrics={
            "decisions_unchanged": lambda ref, cand: decisions_unchanged(ref[0], cand[0], VAD_THRESHOLD),
            "max_probability_difference": max_abs_difference,
            "fp32_speech_fraction": lambda ref, cand: float(np.mean(ref[0] > VAD_THRESHOLD)),
        },
    )
