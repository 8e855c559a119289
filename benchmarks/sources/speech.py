"""Synthesized English speech: sentences spoken by espeak-ng with pauses, over background noise, at 16 kHz."""

from __future__ import annotations

import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
_VOICES = ("en-us", "en-gb+f2", "en-gb-scotland+m3", "en-gb-x-rp+f4", "en-029")


def speech_stream(sentences: Sequence[str], seconds: float, seed: int) -> np.ndarray:
    """About `seconds` of 16 kHz mono audio: sentences spoken one after another with pauses, over noise.

    Speech is synthesized by espeak-ng (voice, rate, pitch and loudness drawn per sentence). Deterministic for a
    given seed and espeak-ng version.
    """
    rng = np.random.default_rng(seed)
    pieces = [np.zeros(int(rng.uniform(0.5, 1.5) * SAMPLE_RATE), np.float32)]
    total = len(pieces[0])
    index = 0
    while total < seconds * SAMPLE_RATE:
        text = sentences[index % len(sentences)]
        index += 1
        utterance = _espeak(text, rng)
        utterance = utterance / max(np.max(np.abs(utterance)), 1e-6) * rng.uniform(0.15, 0.8)
        pause = np.zeros(int(rng.uniform(0.4, 3.0) * SAMPLE_RATE), np.float32)
        pieces += [utterance.astype(np.float32), pause]
        total += len(utterance) + len(pause)
    audio = np.concatenate(pieces)[: int(seconds * SAMPLE_RATE)]
    return (audio + _background_noise(len(audio), rng)).astype(np.float32)


def espeak_version() -> str:
    """The installed espeak-ng's version, or "" when it cannot be run."""
    try:
        line = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    words = line.split()
    return words[words.index("text-to-speech:") + 1] if "text-to-speech:" in words else ""


def _espeak(text: str, rng: np.random.Generator) -> np.ndarray:
    voice = _VOICES[int(rng.integers(len(_VOICES)))]
    rate, pitch = int(rng.integers(130, 190)), int(rng.integers(30, 75))
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(wav_path), text],
            check=True,
            capture_output=True,
        )
        with wave.open(str(wav_path), "rb") as wav:
            rate_in = wav.getframerate()
            samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float32) / 32768.0
    return _resample(samples, rate_in, SAMPLE_RATE)


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Low-pass (windowed sinc, below the new Nyquist) and interpolate; good enough for a VAD's input."""
    if rate_in == rate_out:
        return samples
    cutoff = 0.45 * min(rate_in, rate_out) / rate_in  # in cycles per input sample
    n = np.arange(-32, 33)
    taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(len(n))
    filtered = np.convolve(samples, taps / taps.sum(), mode="same")
    times = np.arange(int(len(samples) * rate_out / rate_in)) * (rate_in / rate_out)
    return np.interp(times, np.arange(len(samples)), filtered).astype(np.float32)


def _background_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    """Pink-ish noise with a slowly varying level (about -45 to -30 dBFS) and a faint mains hum."""
    white = rng.standard_normal(length)
    pink = np.convolve(white, np.exp(-np.arange(64) / 16.0), mode="same")
    pink /= np.std(pink)
    t = np.arange(length) / SAMPLE_RATE
    level = 10 ** (rng.uniform(-45, -35) / 20) * (1 + 0.8 * np.abs(np.sin(2 * np.pi * t / 17.0)))
    hum = 10 ** (-50 / 20) * np.sin(2 * np.pi * 50 * t)
    return (level * pink + hum).astype(np.float32)
