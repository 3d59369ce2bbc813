"""FROZEN naive reference (issue 21): the per-image code of vtc.methods.divprune as it was before vectorising.

Do not edit: tests/test_vectorised_equal.py checks the batched implementation against it.
"""


from __future__ import annotations

from typing import Literal

import torch

from vtc.methods.base import Budget, Method, Selection, Signal, Signals, VTCError
from naive.primitives import cosine_distance_matrix, greedy_max_min


def most_isolated(distance: torch.Tensor) -> int:
    """The token whose nearest other token is farthest away."""
    masked = distance + torch.diag(torch.full((distance.shape[0],), float("inf")))
    return int(masked.min(dim=0).values.argmax())


def divprune_indices(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's k picks among (N, D) vectors, in raster order."""
    if k >= vectors.shape[0]:
        return torch.arange(vectors.shape[0])
    distance = cosine_distance_matrix(vectors)
    return greedy_max_min(distance, k, most_isolated(distance)).sort().values


class DivPrune(Method):
    """DivPrune: greedy max-min diversity over the projected visual tokens (Alvar et al. 2025)."""

    paper = "arXiv:2503.02175 (CVPR 2025)"
    pairwise = True
    code = "https://github.com/vbdi/divprune"

    def __init__(self, space: Literal["projected", "features"] = "projected"):
        if space not in ("projected", "features"):
            raise VTCError(f"divprune: space must be 'projected' or 'features', got {space!r}")
        self.space = space
        self.needs = frozenset({Signal.FEATURES, Signal.PROJECTED if space == "projected" else Signal.FEATURES})

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        vectors = signals.projected[0] if self.space == "projected" else signals.features[0]
        kept = divprune_indices(vectors, budget.tokens(signals.num_patches))
        return Selection.build(signals.features[0], kept)
