"""DivPrune: keep a maximally diverse subset of the visual tokens (greedy max-min diversity).

Paper: Alvar, Singh, Akbari, Zhang. "DivPrune: Diversity-based Visual Token Pruning for
Large Multimodal Models", CVPR 2025, arXiv 2503.02175.
Official code: https://github.com/vbdi/divprune (CC BY-NC 4.0: this is a clean-room
implementation from the paper's description; no code was taken from it).

Algorithm (the Max-Min Diversity Problem, solved greedily), for one image of N tokens:
  d(i, j) = 1 - cos(v_i, v_j) on the visual tokens after the projector (the LLM's
  input space, the official feature space);
  1. first pick: the most isolated token, argmax_j of its nearest-neighbour distance;
  2. then, T-1 times: the token whose distance to the chosen set (its minimum over the
     set) is largest;
  3. the picks go back into raster order; nothing is merged.

Needs token-token similarity by design: it builds the (N, N) cosine-distance matrix
(576 x 576 floats = 1.3 MB for LLaVA-1.5); the greedy loop is O(T N) on top of it.
A batch is selected at once: one batched matmul for the B matrices (its cost, O(N^2 D),
dominates), then T batched argmax steps for every image together.
Defaults: post-projector tokens (``space="projected"``), the budget's T (the paper's
main setting is 9.8% of 576 = 56 tokens).
Option: ``space="features"`` measures diversity on the vision features instead.
Deliberate differences from the official code (as described in the project's reference
notes; its CC BY-NC code was not read):
  * Precision: the official code runs the model, and so the distance matrix, in fp16;
    vtc computes the distances in fp32 whatever the model's dtype, so near-ties may
    break differently.
  * No re-picks: the official loop scores an already chosen token by its distance to
    the set, i.e. to itself (0, or a small fp16 rounding value), instead of excluding
    it, so when every remaining token is a duplicate of a chosen one (or rounding
    makes a self-distance the largest) it can pick the same token again and keep
    fewer than T distinct tokens. vtc excludes chosen tokens: always T distinct
    tokens (ties go to the lower index).
  * The official code slices the image tokens out of the merged prompt embeddings
    with a hard-coded offset; we read them straight from the projector, which is the
    same set of vectors.
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import Budget, Method, Selection, Signal, Signals, VTCError, register
from .primitives import cosine_distance_matrix, greedy_max_min


def most_isolated(distance: torch.Tensor) -> torch.Tensor:
    """The token whose nearest other token is farthest away: (B,) for (B, N, N), a 0-d tensor for (N, N)."""
    diagonal = distance.diagonal(dim1=-2, dim2=-1)
    saved = diagonal.clone()
    diagonal.fill_(float("inf"))  # a token is not its own nearest neighbour
    nearest_other = distance.min(dim=-2).values
    diagonal.copy_(saved)
    return nearest_other.argmax(dim=-1)


def divprune_indices(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's k picks among (N, D) vectors, or (B, N, D) for a batch at once, in raster order."""
    n = vectors.shape[-2]
    if k >= n:
        return torch.arange(n).expand(*vectors.shape[:-2], n)
    distance = cosine_distance_matrix(vectors)
    return greedy_max_min(distance, k, most_isolated(distance)).sort(dim=-1).values


@register("divprune")
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

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        vectors = signals.projected if self.space == "projected" else signals.features
        kept = divprune_indices(vectors, budget.tokens(signals.num_patches))  # (B, k): the whole batch at once
        return Selection.from_kept(signals.features, kept)
