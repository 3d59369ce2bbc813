"""ToDRE, vision-side stage: a diverse subset of the visual tokens, seeded at the most [CLS]-attended patch.

Paper: Li, Yang, Lu. "ToDRE: Effective Visual Token Pruning via Token Diversity and Task
Relevance" (v1: "Visual Token Pruning via Diversity and Task Awareness for Efficient
LVLMs"), arXiv 2505.18757 (2025).
Code: no official repository was found; this follows the paper's description.

Stage 1 (after the vision encoder), for one image of N patches and budget T:
  d(i, j) = 1 - cos(x_i, x_j) on the feature-layer patches;
  seed: the patch with the highest CLS attention (layer -2, mean over heads), the
  "pivot"; then greedily add the patch farthest from the chosen set (k-center /
  max-min, ``objective="maxmin"``, v1) or with the largest summed distance to it
  (``objective="maxsum"``, the v2 wording). Picks go back into raster order.
Stage 2 of the paper (task relevance: dropping visual tokens the text stops attending
to inside the language model) acts inside the LLM; it is not part of this method.

Needs token-token similarity by design: builds the (N, N) cosine-distance matrix
(one batched matmul for the batch), then T batched greedy picks for every image at once.
Deliberate differences: the seed and distance space follow our reading of the paper
(no code to check against); treat ``todre`` as the paper's stage 1, not a reproduction
of its numbers.
"""

from __future__ import annotations

from typing import Literal

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register
from .primitives import cosine_distance_matrix, greedy_max_min, greedy_max_sum


@register("todre")
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

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        feats, k = signals.features, budget.tokens(signals.num_patches)
        seeds = signals.cls_attn.argmax(dim=-1)  # (B,) the pivot of every image
        greedy = greedy_max_min if self.objective == "maxmin" else greedy_max_sum
        kept = greedy(cosine_distance_matrix(feats), k, seeds).sort(dim=-1).values  # (B, k), one batched loop
        return Selection.from_kept(feats, kept)
