"""Rendered text images: words of the English corpus, numbers, prices and dates drawn by Pillow over textured
backgrounds, with boxes and lines that are not text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sources.english_text import SENTENCES

_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Italic.ttf",
)


def render_text_image(seed: int, height: int, width: int) -> np.ndarray:
    """An RGB uint8 image of words at random places, sizes, fonts, colours and angles over a textured background.

    Words come from english_text.SENTENCES, plus numbers, prices and dates; Pillow's bundled font is used when no
    DejaVu font is installed. Deterministic for a given seed (and font set).
    """
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = np.random.default_rng(seed)
    words = sorted({w.strip(".,;:!?'\"") for s in SENTENCES for w in s.split()} - {""})
    dark = rng.random() < 0.3
    base = rng.integers(0, 70, 3) if dark else rng.integers(170, 256, 3)
    gradient = np.linspace(0, rng.uniform(-40, 40), width)[None, :, None]
    background = base[None, None, :] + gradient + rng.normal(0, rng.uniform(2, 12), (height, width, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):  # distractors: boxes and lines that are not text
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(2, 120))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=int(rng.integers(1, 4)))
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 5)))
    fonts = [f for f in _FONT_FILES if Path(f).exists()]
    for _ in range(int(rng.integers(4, 12))):
        size = int(rng.integers(12, 56))
        font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size) if fonts else ImageFont.load_default(size)
        text = _phrase(words, rng)
        ink = rng.integers(180, 256, 3) if dark else rng.integers(0, 90, 3)
        colour = tuple(int(c) for c in ink)
        angle = float(rng.choice([0, 0, 0, rng.uniform(-12, 12), 90]))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        layer = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(layer).text((2 - left, 2 - top), text, fill=255, font=font)
        layer = layer.rotate(angle, expand=True, resample=Image.BICUBIC)
        if layer.width >= width or layer.height >= height:
            continue
        x, y = int(rng.integers(0, width - layer.width)), int(rng.integers(0, height - layer.height))
        image.paste(Image.new("RGB", layer.size, colour), (x, y), layer)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    return np.asarray(image, np.uint8)


def _phrase(words: Sequence[str], rng: np.random.Generator) -> str:
    kind = rng.random()
    if kind < 0.1:
        return f"${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if kind < 0.2:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}"
    chosen = [words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 6)))]
    phrase = " ".join(chosen)
    return phrase.upper() if rng.random() < 0.2 else phrase
