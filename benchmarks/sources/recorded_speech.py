"""Recorded English speech, most of it with its text: the test recordings of the pocketsphinx 5.1.1 source
distribution, read from its .tar.gz or from the folder it unpacks to, as 16 kHz mono float32.

Not fetched at run time. Fetch it once and name it in $ONNXFORGE_SPEECH_SOURCE (benchmarks/README.md):

    pip download --no-deps --no-binary :all: pocketsphinx==5.1.1 -d ~/speech
    export ONNXFORGE_SPEECH_SOURCE=~/speech/pocketsphinx-5.1.1.tar.gz
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPEECH_SOURCE_VARIABLE = "ONNXFORGE_SPEECH_SOURCE"
POCKETSPHINX_VERSION = "5.1.1"
FETCH_COMMAND = f"pip download --no-deps --no-binary :all: pocketsphinx=={POCKETSPHINX_VERSION} -d DIR"
SAMPLE_RATE = 16000
_DATA = "test/data"  # where the recordings lie in the source distribution
# Recordings whose text the distribution gives in its own files (the pocketsphinx tests' expected words).
_KNOWN_TEXT = {
    "goforward.raw": "go forward ten meters",
    "forever/input_2_16k.wav": "feels like these days go on forever",
}
# Recordings it gives no text for; usable where no text is needed.
_TEXT_UNKNOWN = ("numbers.raw", "something.raw", "tidigits/dhd.2934z.raw", "forever/input_4_16k.wav")
_TRANSCRIPTION_LINE = re.compile(r"<s>\s*(.*?)\s*</s>\s*\((.*)\)")


class SpeechSourceMissing(RuntimeError):
    """The recorded speech is not where $ONNXFORGE_SPEECH_SOURCE says, or that variable is not set."""


@dataclass(frozen=True)
class Utterance:
    """One recording: its path under test/data, its samples (16 kHz mono, [-1, 1)), and its text or None."""

    name: str
    audio: np.ndarray
    text: str | None


def speech_source() -> Path:
    """The pocketsphinx source distribution named by $ONNXFORGE_SPEECH_SOURCE (its .tar.gz or the unpacked folder);
    SpeechSourceMissing, saying how to fetch it, when it is not there."""
    value = os.environ.get(SPEECH_SOURCE_VARIABLE)
    path = Path(value).expanduser() if value else None
    if path is None or not path.exists():
        where = f"{SPEECH_SOURCE_VARIABLE}={value} does not exist" if value else f"{SPEECH_SOURCE_VARIABLE} is not set"
        raise SpeechSourceMissing(
            f"recorded speech not found ({where}): fetch it with `{FETCH_COMMAND}` and set "
            f"{SPEECH_SOURCE_VARIABLE} to DIR/pocketsphinx-{POCKETSPHINX_VERSION}.tar.gz"
        )
    return path


def recorded_utterances(source: Path) -> list[Utterance]:
    """The distribution's usable English recordings, in a fixed order: five LibriVox sentences (Sense and
    Sensibility), five spoken card names, two more sentences with their text, and four recordings without it."""
    read = _reader(Path(source))
    utterances = []
    for text, name in _transcription(read, "librivox/transcription"):
        utterances.append(Utterance(f"librivox/{name}.wav", _wav(read(f"librivox/{name}.wav")), text))
    for text, name in _transcription(read, "cards/cards.transcription"):
        utterances.append(Utterance(f"cards/{name}.wav", _wav(read(f"cards/{name}.wav")), text))
    for name, text in [*_KNOWN_TEXT.items(), *((name, None) for name in _TEXT_UNKNOWN)]:
        data = read(name)
        utterances.append(Utterance(name, _raw(data) if name.endswith(".raw") else _wav(data), text))
    return utterances


def _reader(source: Path) -> Callable[[str], bytes]:
    """A function from a path under test/data to that file's bytes, in the .tar.gz or the unpacked folder."""
    root = f"pocketsphinx-{POCKETSPHINX_VERSION}"
    if source.is_dir():
        folder = next((d for d in (source, source / root) if (d / _DATA).is_dir()), None)
        if folder is None:
            raise SpeechSourceMissing(f"{source} holds no {_DATA} folder: give the unpacked pocketsphinx source")
        return lambda name: (folder / _DATA / name).read_bytes()
    with tarfile.open(source) as archive:
        prefix = f"{root}/{_DATA}/"
        members = [m for m in archive if m.name.startswith(prefix) and m.isfile()]  # about 4 MB in all
        files = {m.name[len(prefix) :]: archive.extractfile(m).read() for m in members}
    if not files:
        raise SpeechSourceMissing(f"{source} holds no {prefix}: give pocketsphinx-{POCKETSPHINX_VERSION}.tar.gz")
    return files.__getitem__


def _transcription(read: Callable[[str], bytes], name: str) -> list[tuple[str, str]]:
    """(text, recording id) per line of a Sphinx transcription file: `<s> words </s> (id)`."""
    lines = read(name).decode("utf-8").splitlines()
    return [_TRANSCRIPTION_LINE.fullmatch(line.strip()).groups() for line in lines if line.strip()]


def _wav(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as wav:
        if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ValueError("expected 16-bit mono 16 kHz audio")
        return _raw(wav.readframes(wav.getnframes()))


def _raw(data: bytes) -> np.ndarray:
    """Headerless 16-bit little-endian PCM, as the distribution's .raw files are (16 kHz mono)."""
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
