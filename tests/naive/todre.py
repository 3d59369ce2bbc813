"""FROZEN naive reference (issue 21): the per-image code of vtc.methods.todre as it was before vectorising.

Do not edit: tests/test_vectorised_equal.py checks the batched implementation against it.
"""


from __future__ import annotations

from typing import Literal

from vtc.methods.base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError
from naive.primitives import cosine_distance_matrix, greedy_max_min, greedy_max_sum


class ToDRE(Method):
    """ToDRE stage 1: diversity-driven selection seeded at the top CLS-attention patch (Li et al. 2025)."""

    needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN})
    attention = AttentionSpec(layer=-2, heads="mean")
    paper = "arXiv:2505.18757"
    pairwise = True
    code = "no official code"

    def __init__(self, objective: Literal["maxmin", "maxsum"] = "maxmin"):
        if objective not in ("maxmin", "maxsum"):
            raise VTCError(f"todre: objective must be 'maxmin' or 'maxsum', got {objective!r}")
        self.objective = objective

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        feats, k = signals.features[0], budget.tokens(signals.num_patches)
        seed = int(signals.cls_attn[0].argmax())
        greedy = greedy_max_min if self.objective == "maxmin" else greedy_max_sum
        kept = greedy(cosine_distance_matrix(feats), k, seed).sort().values
        return Selection.build(feats, kept)
