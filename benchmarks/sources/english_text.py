"""Real English text for the trained cases, read from the corpora in benchmarks/data/.

`SENTENCES`: sentences and passages of varied length and topic; the first `CALIBRATION_COUNT` calibrate, the rest
are held out. `MORE_SENTENCES`: more text to calibrate the sentence encoder on, none of it in `SENTENCES`.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


def read_corpus(path: Path) -> tuple[str, ...]:
    """The sentences of a corpus file: one a line, skipping empty lines and comment lines starting with #."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line and not line.startswith("#"))


SENTENCES = read_corpus(DATA / "english_sentences.txt")
MORE_SENTENCES = read_corpus(DATA / "more_english_sentences.txt")
CALIBRATION_COUNT = 64  # the first 64 sentences calibrate, the rest are held out
