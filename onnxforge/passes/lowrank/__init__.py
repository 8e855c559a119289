"""Low-rank factorization: `factorization` computes the factors (plain or whitened SVD), `lowrank` rewrites layers."""

from __future__ import annotations

from onnxforge.passes.lowrank.lowrank import LowRank

__all__ = ["LowRank"]
