"""Perturbed and mixed copies of sample inputs, for the teacher to label: token ids get replacements and masked
spans, audio noise, gain, time shift and speed, images flips, shifts and colour jitter, other float inputs noise;
float inputs of two samples of one shape are mixed. Every copy has exactly its sample's shapes and dtypes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Sample = Mapping[str, np.ndarray]

AUDIO_MIN_LENGTH = 1000  # a float input whose last axis is at least this long, on at most 2 channels, is audio
TOKEN_MIN_DISTINCT = 16  # an integer input with at least this many distinct values over the samples holds tokens


class Augmenter:
    """Draws perturbed copies of `samples`, each input perturbed as what it looks like (see the module doc)."""

    def __init__(self, samples: Sequence[Sample], seed: int = 0):
        self.samples = [dict(sample) for sample in samples]
        self.rng = np.random.default_rng(seed)
        names = self.samples[0].keys() if self.samples else []
        self.kinds = {name: _kind([sample[name] for sample in self.samples]) for name in names}
        self.vocabulary = {
            name: np.unique(np.concatenate([np.ravel(sample[name]) for sample in self.samples]))
            for name, kind in self.kinds.items()
            if kind == "tokens"
        }

    def draw(self) -> dict[str, np.ndarray]:
        """One perturbed copy of a random sample (mixed with another of the same shapes, half the time)."""
        sample = self.samples[self.rng.integers(len(self.samples))]
        partner = self.samples[self.rng.integers(len(self.samples))]
        mix = self.rng.uniform(0.6, 1.0) if self.rng.random() < 0.5 else 1.0
        copy = {}
        for name, value in sample.items():
            value = np.asarray(value)
            other = np.asarray(partner[name])
            if mix < 1.0 and value.dtype.kind == "f" and other.shape == value.shape:
                value = (mix * value + (1 - mix) * other).astype(value.dtype)
            copy[name] = self._perturbed(name, value)
        return copy

    def _perturbed(self, name: str, value: np.ndarray) -> np.ndarray:
        kind = self.kinds[name]
        if kind == "tokens":
            return self._tokens(name, value)
        if kind == "audio":
            return self._audio(value)
        if kind == "image":
            return self._image(value)
        if kind == "float":
            scale = float(np.std(value)) or 1.0
            return (value + self.rng.normal(0, 0.05 * scale, value.shape)).astype(value.dtype)
        return value

    def _tokens(self, name: str, ids: np.ndarray) -> np.ndarray:
        """About 10% of positions replaced by tokens seen in the samples, and one span of up to 4 set to one."""
        if ids.ndim == 0 or ids.size < 2:
            return ids
        vocabulary = self.vocabulary[name]
        flat = ids.reshape(-1, ids.shape[-1]).copy()
        replace = self.rng.random(flat.shape) < 0.1
        flat[replace] = self.rng.choice(vocabulary, int(replace.sum()))
        row = self.rng.integers(flat.shape[0])
        length = int(self.rng.integers(1, min(4, flat.shape[1]) + 1))
        start = int(self.rng.integers(0, flat.shape[1] - length + 1))
        flat[row, start : start + length] = self.rng.choice(vocabulary)
        return flat.reshape(ids.shape).astype(ids.dtype)

    def _audio(self, audio: np.ndarray) -> np.ndarray:
        """Speed 0.9-1.1x (cropped or padded back to length), a time shift of up to 10%, gain 0.5-1.5x, and noise
        20-40 dB below the signal."""
        length = audio.shape[-1]
        speed = self.rng.uniform(0.9, 1.1)
        positions = np.arange(length) * speed
        inside = positions <= length - 1
        resampled = np.zeros_like(audio)
        flat, out = audio.reshape(-1, length), resampled.reshape(-1, length)
        for row in range(flat.shape[0]):
            out[row, inside] = np.interp(positions[inside], np.arange(length), flat[row])
        shifted = np.roll(resampled, int(self.rng.integers(-length // 10, length // 10 + 1)), axis=-1)
        gained = shifted * self.rng.uniform(0.5, 1.5)
        power = float(np.mean(gained.astype(np.float64) ** 2)) or 1e-12
        noise = self.rng.normal(0, np.sqrt(power / 10 ** (self.rng.uniform(20, 40) / 10)), audio.shape)
        return (gained + noise).astype(audio.dtype)

    def _image(self, image: np.ndarray) -> np.ndarray:
        """A horizontal flip half the time, a shift of up to 10% each way (edges repeated), and brightness and
        contrast each within 10% per channel."""
        out = image[..., ::-1] if self.rng.random() < 0.5 else image
        height, width = out.shape[-2:]
        dy, dx = (int(self.rng.integers(-(size // 10), size // 10 + 1)) for size in (height, width))
        rows = np.clip(np.arange(height) - dy, 0, height - 1)
        cols = np.clip(np.arange(width) - dx, 0, width - 1)
        out = out[..., rows, :][..., cols]
        channels = (1, out.shape[1], 1, 1) if out.ndim == 4 else (1,) * out.ndim
        mean = out.mean(axis=(-2, -1), keepdims=True)
        contrast = self.rng.uniform(0.9, 1.1, channels)
        brightness = self.rng.uniform(-0.1, 0.1, channels) * (float(np.std(out)) or 1.0)
        return ((out - mean) * contrast + mean + brightness).astype(image.dtype)


def _kind(values: list[np.ndarray]) -> str:
    """What an input looks like over the samples: tokens, audio, image, float or fixed (left as it is)."""
    first = np.asarray(values[0])
    if first.dtype.kind in "iu":
        distinct = len(np.unique(np.concatenate([np.ravel(v) for v in values])))
        return "tokens" if first.ndim >= 1 and distinct >= TOKEN_MIN_DISTINCT else "fixed"
    if first.dtype.kind != "f" or first.ndim == 0 or first.size < 2:
        return "fixed"
    if first.shape[-1] >= AUDIO_MIN_LENGTH and (first.ndim <= 2 or int(np.prod(first.shape[1:-1])) <= 2):
        return "audio"
    if first.ndim == 4 and first.shape[1] in (1, 3, 4) and min(first.shape[-2:]) >= 8:
        return "image"
    return "float"
