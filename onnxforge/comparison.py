"""Numerical comparison of a candidate model's outputs against a reference model's."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxforge.errors import OnnxforgeError

# Guards the relative error against division by zero when the reference output is all zeros.
_TINY = float(np.finfo(np.float32).tiny)

Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class OutputComparison:
    """How far one candidate output is from the reference, over every compared run.

    - `max_abs`: largest |reference - candidate| over all runs.
    - `max_rel`: per run, `max|reference - candidate| / max(max|reference|, tiny)`, i.e. the error
      relative to the scale of the whole output (not element-wise, which explodes near zeros);
      the worst run is kept.
    - `cosine`: cosine similarity of the flattened outputs, the worst run kept; 1.0 when both are
      all zeros; None for integer and bool outputs. Computed over positions where both are finite.
    - `top1_agreement`: fraction of rows (all axes but the last) whose argmax over the last axis
      agrees, pooled over runs; None for integer/bool outputs or rank < 2.
    - `mismatch_fraction`: fraction of elements not exactly equal, pooled over runs; set only for
      integer and bool outputs, which are compared exactly.

    NaN (or an infinity of the same sign) at the same position in both counts as equal; a NaN or
    infinity in only one makes `max_abs` and `max_rel` infinite. A shape mismatch in any run sets
    `shape_mismatch`, makes `max_abs` and `max_rel` infinite and leaves the other metrics None.
    """

    name: str
    max_abs: float
    max_rel: float
    cosine: float | None
    top1_agreement: float | None
    mismatch_fraction: float | None
    shape_mismatch: bool

    def within(self, rel_tol: float, mismatch_tol: float = 0.0) -> bool:
        """Tell whether this output is close enough: float by `max_rel`, integer/bool by `mismatch_fraction`."""
        if self.shape_mismatch:
            return False
        if self.mismatch_fraction is not None:
            return self.mismatch_fraction <= mismatch_tol
        return self.max_rel <= rel_tol


@dataclass(frozen=True)
class Comparison:
    """Comparison of every output of two models; the properties give the worst output."""

    outputs: list[OutputComparison]

    @property
    def max_abs(self) -> float:
        """Largest absolute error of any output."""
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        """Largest relative error of any output (see `OutputComparison.max_rel`)."""
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float | None:
        """Smallest cosine similarity of any float output; None when there is none."""
        return min((o.cosine for o in self.outputs if o.cosine is not None), default=None)

    @property
    def min_top1_agreement(self) -> float | None:
        """Smallest top-1 agreement of any output that has one; None when there is none."""
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values, default=None)

    @property
    def max_mismatch_fraction(self) -> float | None:
        """Largest mismatch fraction of any integer/bool output; None when there is none."""
        values = [o.mismatch_fraction for o in self.outputs if o.mismatch_fraction is not None]
        return max(values, default=None)

    @property
    def shape_mismatch(self) -> bool:
        """True when any output changed shape."""
        return any(o.shape_mismatch for o in self.outputs)

    def within(self, rel_tol: float, mismatch_tol: float = 0.0) -> bool:
        """Tell whether every output is within tolerance (see `OutputComparison.within`)."""
        return all(o.within(rel_tol, mismatch_tol) for o in self.outputs)

    def to_dict(self) -> dict[str, object]:
        """Return the worst-case summary and every output's metrics as a JSON-ready dict.

        Infinite errors are kept as `float('inf')`; JSON writers must allow them or map them.
        """
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "min_cosine": self.min_cosine,
            "min_top1_agreement": self.min_top1_agreement,
            "max_mismatch_fraction": self.max_mismatch_fraction,
            "shape_mismatch": self.shape_mismatch,
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
        }


def compare_outputs(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> Comparison:
    """Compare the outputs of two models run on the same inputs, one mapping per run.

    Outputs are matched by name; when the two sides name them differently they are matched by
    position and reported under the reference's names.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference runs but {len(candidate)} candidate runs")
    if not reference:
        return Comparison(outputs=[])
    pairs = _pair_names(list(reference[0]), list(candidate[0]))
    for ref_run, cand_run in zip(reference, candidate):
        if set(ref_run) != set(reference[0]) or set(cand_run) != set(candidate[0]):
            raise ValueError("every run must produce the same output names")
    return Comparison(
        outputs=[
            _compare_one(ref_name, [r[ref_name] for r in reference], [c[cand_name] for c in candidate])
            for ref_name, cand_name in pairs
        ]
    )


def _pair_names(ref_names: list[str], cand_names: list[str]) -> list[tuple[str, str]]:
    if set(ref_names) == set(cand_names):
        return [(name, name) for name in ref_names]
    if len(ref_names) == len(cand_names):
        return list(zip(ref_names, cand_names))
    raise OnnxforgeError(
        f"cannot compare outputs: the reference has {len(ref_names)} ({', '.join(ref_names)}) and the "
        f"candidate {len(cand_names)} ({', '.join(cand_names)}); an optimization must keep the model's outputs"
    )


def _compare_one(name: str, refs: list[np.ndarray], cands: list[np.ndarray]) -> OutputComparison:
    refs = [np.asarray(r) for r in refs]
    cands = [np.asarray(c) for c in cands]
    if any(r.shape != c.shape for r, c in zip(refs, cands)):
        return OutputComparison(name, math.inf, math.inf, None, None, None, shape_mismatch=True)
    if any(_is_float(a) for a in refs + cands):
        errors = [_abs_and_rel_error(r, c) for r, c in zip(refs, cands)]
        return OutputComparison(
            name,
            max_abs=max(e[0] for e in errors),
            max_rel=max(e[1] for e in errors),
            cosine=min(_cosine(r, c) for r, c in zip(refs, cands)),
            top1_agreement=_top1_agreement(refs, cands),
            mismatch_fraction=None,
            shape_mismatch=False,
        )
    mismatched = sum(int(np.count_nonzero(r != c)) for r, c in zip(refs, cands))
    total = sum(r.size for r in refs)
    if all(a.dtype.kind in "biu" for a in refs + cands):
        errors = [_abs_and_rel_error(r, c) for r, c in zip(refs, cands)]
        max_abs, max_rel = max(e[0] for e in errors), max(e[1] for e in errors)
    else:  # strings: there is no distance, only equal or not
        max_abs = max_rel = 0.0 if mismatched == 0 else math.inf
    return OutputComparison(
        name, max_abs, max_rel, None, None, mismatched / total if total else 0.0, shape_mismatch=False
    )


def _is_float(array: np.ndarray) -> bool:
    # ml_dtypes' bfloat16 and float8 types have kind "V"; their names are what marks them as floats.
    return array.dtype.kind == "f" or array.dtype.name.startswith(("bfloat", "float"))


def _abs_and_rel_error(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    if ref.size == 0:
        return 0.0, 0.0
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    same_nonfinite = (np.isnan(r) & np.isnan(c)) | ((r == c) & np.isinf(r))
    finite = np.isfinite(r) & np.isfinite(c)
    if not np.all(same_nonfinite | finite):
        return math.inf, math.inf
    if not finite.any():
        return 0.0, 0.0
    max_abs = float(np.max(np.abs(r[finite] - c[finite])))
    scale = max(float(np.max(np.abs(r[finite]))), _TINY)
    return max_abs, max_abs / scale


def _cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    finite = np.isfinite(r) & np.isfinite(c)
    r, c = r[finite], c[finite]
    norm_r, norm_c = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if norm_r == 0.0 and norm_c == 0.0:
        return 1.0
    if norm_r == 0.0 or norm_c == 0.0:
        return 0.0
    return float(np.clip(np.dot(r, c) / (norm_r * norm_c), -1.0, 1.0))


def _top1_agreement(refs: list[np.ndarray], cands: list[np.ndarray]) -> float | None:
    if refs[0].ndim < 2 or refs[0].shape[-1] == 0:
        return None
    agree = rows = 0
    for r, c in zip(refs, cands):
        r2, c2 = r.astype(np.float64).reshape(-1, r.shape[-1]), c.astype(np.float64).reshape(-1, c.shape[-1])
        agree += int(np.count_nonzero(r2.argmax(axis=-1) == c2.argmax(axis=-1)))
        rows += r2.shape[0]
    return agree / rows if rows else None
