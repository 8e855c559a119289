"""Two CNNs that ship in pip packages, on rendered text images: the `captcha-detector` case (the YOLOX character
detector of ddddocr, judged by its detections after decoding and NMS) and the `ocr-classifier` case (the text-line
angle classifier of rapidocr-onnxruntime, judged by its decision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cases.agreement import relative_l2
from cases.packages import package_dir, package_version
from cases.trained_case import TrainedCase, fixed_input_copy
from sources.text_images import render_text_image

DETECTOR_SIZE = 416  # ddddocr letterboxes every image into 416 x 416 (grey 114 padding)
DETECTOR_STRIDES = (8, 16, 32)
SCORE_THRESHOLD, NMS_IOU, MATCH_IOU = 0.1, 0.45, 0.5  # ddddocr's thresholds; a detection matches at IoU 0.5
CLASSIFIER_HEIGHT, CLASSIFIER_WIDTH = 48, 192  # rapidocr's angle classifier input
IMAGES = 16


def captcha_detector_case(work_dir: Path) -> TrainedCase:
    """ddddocr's YOLOX character detector (common_det.onnx, opset 11, 1x3x416x416) on rendered text images."""
    source = package_dir("ddddocr") / "common_det.onnx"
    calibration = [{"images": _letterboxed(_image(seed, 160, 480))} for seed in range(IMAGES)]
    held_out = [{"images": _letterboxed(_image(seed, 160, 480))} for seed in range(2000, 2000 + IMAGES)]
    return TrainedCase(
        name="captcha-detector",
        description=(
            f"YOLOX captcha character detector from pip package ddddocr {package_version('ddddocr')} (MIT), file "
            "ddddocr/common_det.onnx, opset 11, input 1x3x416x416 (BGR 0-255, letterboxed with grey 114 as ddddocr "
            f"does), output 3549 boxes x (box, objectness, class); images: words rendered with Pillow "
            f"{package_version('pillow')} at 160x480, {IMAGES} calibrate, {IMAGES} others are held out; detections "
            f"decoded as ddddocr decodes them (score > {SCORE_THRESHOLD}, NMS at IoU {NMS_IOU})"
        ),
        model_path=source,
        calibration=calibration,
        held_out=held_out,
        timing_feed=held_out[0],
        headline="detections_agree",
        metrics={"detections_agree": detections_agree, "relative_l2": relative_l2},
    )


def ocr_classifier_case(work_dir: Path) -> TrainedCase:
    """rapidocr's text-line angle classifier (a MobileNetV3 CNN, opset 11) at 1x3x48x192 on rendered text lines."""
    source = package_dir("rapidocr_onnxruntime") / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    path = fixed_input_copy(source, work_dir / "ocr-classifier.onnx", (1, 3, CLASSIFIER_HEIGHT, CLASSIFIER_WIDTH))
    lines = [_classifier_input(_image(seed, CLASSIFIER_HEIGHT, CLASSIFIER_WIDTH), seed) for seed in range(64)]
    held = [_classifier_input(_image(seed, CLASSIFIER_HEIGHT, CLASSIFIER_WIDTH), seed) for seed in range(3000, 3064)]
    return TrainedCase(
        name="ocr-classifier",
        description=(
            "PP-OCR text-line angle classifier (MobileNetV3, CNN) from pip package rapidocr-onnxruntime "
            f"{package_version('rapidocr-onnxruntime')} (Apache-2.0), file rapidocr_onnxruntime/models/"
            f"ch_ppocr_mobile_v2.0_cls_infer.onnx, opset 11, input fixed at 1x3x{CLASSIFIER_HEIGHT}x"
            f"{CLASSIFIER_WIDTH} ((x/255 - 0.5) / 0.5), output the probabilities of 0 and 180 degrees; lines: words "
            "rendered with Pillow, every other one turned upside down, 64 calibrate, 64 others are held out"
        ),
        model_path=path,
        calibration=[{"x": x} for x in lines],
        held_out=[{"x": x} for x in held],
        timing_feed={"x": held[0]},
        headline="decisions_unchanged",
        metrics={
            "decisions_unchanged": lambda ref, cand: float(
                np.mean([np.argmax(r) == np.argmax(c) for r, c in zip(ref, cand)])
            ),
            "max_probability_difference": lambda ref, cand: float(
                max(np.abs(r - c).max() for r, c in zip(ref, cand))
            ),
        },
    )


def detections_agree(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """The mean over images of the F1 score of the candidate's detections against fp32's (a box matches one of
    the same class at IoU >= MATCH_IOU); 1.0 for an image where neither detects anything."""
    scores = []
    for ref, cand in zip(reference, candidate):
        expected, found = detections(ref), detections(cand)
        if not len(expected) and not len(found):
            scores.append(1.0)
            continue
        matched, used = 0, set()
        for box in expected:
            for index, other in enumerate(found):
                if index not in used and other[5] == box[5] and _iou(box[:4], other[:4]) >= MATCH_IOU:
                    matched += 1
                    used.add(index)
                    break
        scores.append(2 * matched / (len(expected) + len(found)))
    return float(np.mean(scores))


def detections(output: np.ndarray) -> np.ndarray:
    """ddddocr's decoding of one output (1 x boxes x (cx, cy, w, h, objectness, classes...)): boxes on the grid of
    each stride, score = objectness x class score, those above SCORE_THRESHOLD kept by class-agnostic NMS; rows of
    (x1, y1, x2, y2, score, class)."""
    predictions = np.array(output[0], np.float64)
    grids, strides = [], []
    for stride in DETECTOR_STRIDES:
        size = DETECTOR_SIZE // stride
        xs, ys = np.meshgrid(np.arange(size), np.arange(size))
        grids.append(np.stack((xs, ys), 2).reshape(-1, 2))
        strides.append(np.full((size * size, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    centres, sizes = (predictions[:, :2] + grid) * stride, np.exp(predictions[:, 2:4]) * stride
    class_scores = predictions[:, 4:5] * predictions[:, 5:]
    classes, scores = class_scores.argmax(1), class_scores.max(1)
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    keep = scores > SCORE_THRESHOLD
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    chosen, order = [], list(np.argsort(-scores))
    while order:
        best = order.pop(0)
        chosen.append(best)
        order = [i for i in order if _iou(boxes[best], boxes[i]) <= NMS_IOU]
    return np.array([[*boxes[i], scores[i], classes[i]] for i in chosen]).reshape(-1, 6)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return render_text_image(seed, height, width)


def _letterboxed(image: np.ndarray) -> np.ndarray:
    """ddddocr's preprocessing: scaled into 416 x 416 keeping its aspect, grey 114 below and right, BGR, 1x3xHxW
    float32 0-255 (Pillow's bilinear resize where ddddocr uses OpenCV's)."""
    from PIL import Image

    height, width = image.shape[:2]
    ratio = min(DETECTOR_SIZE / height, DETECTOR_SIZE / width)
    size = (int(width * ratio), int(height * ratio))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    padded = np.full((DETECTOR_SIZE, DETECTOR_SIZE, 3), 114, np.uint8)
    padded[: size[1], : size[0]] = resized[:, :, ::-1]
    return padded.transpose(2, 0, 1)[None].astype(np.float32)


def _classifier_input(image: np.ndarray, seed: int) -> np.ndarray:
    """A text line as rapidocr feeds its classifier, turned by 180 degrees for odd seeds."""
    if seed % 2:
        image = image[::-1, ::-1]
    x = image.astype(np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)[None].copy()
