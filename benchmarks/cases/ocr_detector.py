"""The `ocr-detector` case: the DBNet text detector of rapidocr-onnxruntime on rendered text images, judged by the
fraction of pixels whose binarized text map is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cases.agreement import decisions_unchanged, positive_iou, relative_l2
from cases.packages import package_dir, package_version
from cases.trained_case import TrainedCase, fixed_input_copy
from sources.text_images import render_text_image

OCR_FILE = "ch_PP-OCRv4_det_infer.onnx"
OCR_HEIGHT, OCR_WIDTH = 480, 640
OCR_THRESHOLD = 0.3  # DBNet's binarization threshold in rapidocr's config
OCR_IMAGES = 16


def ocr_detector_case(work_dir: Path) -> TrainedCase:
    """The PP-OCRv4 text detector (DBNet) of rapidocr-onnxruntime on rendered text images, 1x3x480x640."""
    source = package_dir("rapidocr_onnxruntime") / "models" / OCR_FILE
    path = fixed_input_copy(source, work_dir / "ocr-detector.onnx", (1, 3, OCR_HEIGHT, OCR_WIDTH))
    calibration = [{"x": detector_input(_image(seed))} for seed in range(OCR_IMAGES)]
    held_out = [{"x": detector_input(_image(seed))} for seed in range(1000, 1000 + OCR_IMAGES)]
    return TrainedCase(
        name="ocr-detector",
        description=(
            f"PP-OCRv4 text detector (DBNet, CNN) from pip package rapidocr-onnxruntime "
            f"{package_version('rapidocr-onnxruntime')}, file rapidocr_onnxruntime/models/{OCR_FILE}, input fixed at "
            f"1x3x{OCR_HEIGHT}x{OCR_WIDTH}, normalized as rapidocr does ((BGR/255 - 0.5) / 0.5); output the "
            f"text probability map 1x1x{OCR_HEIGHT}x{OCR_WIDTH}; images: words rendered with Pillow "
            f"{package_version('pillow')} (fonts, sizes, colours, backgrounds, rotations drawn per image), "
            f"{OCR_IMAGES} calibrate, {OCR_IMAGES} others (different seeds) are held out"
        ),
        model_path=path,
        calibration=calibration,
        held_out=held_out,
        timing_feed=held_out[0],
        headline="pixels_agree",
        metrics={
            "pixels_agree": lambda ref, cand: np.mean(
                [decisions_unchanged(r, c, OCR_THRESHOLD) for r, c in zip(ref, cand)]
            ),
            "relative_l2": relative_l2,
            "text_iou": lambda ref, cand: positive_iou(np.stack(ref), np.stack(cand), OCR_THRESHOLD),
        },
    )


def detector_input(image: np.ndarray) -> np.ndarray:
    """An HxWx3 RGB uint8 image as rapidocr feeds its detector: BGR, (x / 255 - 0.5) / 0.5, 1x3xHxW float32."""
    bgr = image[:, :, ::-1].astype(np.float32)
    return ((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()


def _image(seed: int) -> np.ndarray:
    return render_text_image(seed, OCR_HEIGHT, OCR_WIDTH)
