"""FoPru (Focal Pruning): keep the patches that receive the most attention from the other patches.

Paper: Jiang, Huang, Liu, Zeng, Li, Cheng, Xu. "FoPru: Focal Pruning for Efficient Large
Vision-Language Models", arXiv 2411.14164 (2024).
Code: no official repository was found; the strategies follow the paper and a compact
third-party implementation (FocalPrunning, 'rank' / 'row') in a USTC inference engine.

Algorithm, for one image of N patches on an h x w grid:
  significance s_j = the attention patch j receives, averaged over the N patch queries
  (self-attention of LLaVA's feature layer -2, averaged over heads; CLS row and column
  left out after the softmax over all 1+N keys).
  * ``fopru-rank`` (global): keep the top-T patches by s.
  * ``fopru-row`` (local): sum s over each grid row and keep whole rows, best first,
    which keeps contiguous strips of the image.
  Kept patches go back into raster order; nothing is merged. Equal sums or scores: the
  lower row or index first.

Defaults: layer -2, mean over heads, column-mean significance.
Deliberate differences:
  * Exact budgets for ``row``: whole rows give multiples of w (24 on LLaVA-1.5), so
    floor(T / w) best rows are kept whole and the remaining T mod w slots go to the
    most significant patches of the next best row (64 -> 2 rows + 16 patches).
  * The third-party code may score by the row mean instead when its variance is
    larger; the row mean is nearly constant (softmax rows sum to one), so only the
    column mean is offered.
  * The significance is accumulated from that layer's q/k in chunks of 64 query rows
    (SDPA stays on for the forward): the N x N map is never held at once.
"""

from __future__ import annotations

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, register
from .primitives import top_in_raster_order, top_k_mask


def best_rows(significance: torch.Tensor, grid: tuple[int, int], total: int) -> torch.Tensor:
    """(B, total) raster indices per image of (B, N) significance: whole rows by summed significance,
    then the best patches of the next row."""
    h, w = grid
    per_cell = significance.reshape(-1, h, w)
    ranked_rows = torch.sort(per_cell.sum(2), dim=-1, descending=True, stable=True).indices  # (B, h)
    full, rest = divmod(total, w)
    chosen = [(ranked_rows[:, :full, None] * w + torch.arange(w)).flatten(1)]
    if rest:
        row = ranked_rows[:, full]  # (B,) the next best row of each image
        best = top_in_raster_order(per_cell[torch.arange(per_cell.shape[0]), row], rest)
        chosen.append(best + row[:, None] * w)
    return torch.cat(chosen, dim=1).sort(dim=-1).values


class _FoPru(Method):
    needs = frozenset({Signal.FEATURES, Signal.RECEIVED_ATTN})
    attention = AttentionSpec(layer=-2, heads="mean")
    paper = "arXiv:2411.14164"
    code = "no official code"


@register("fopru-rank")
class FoPruRank(_FoPru):
    """FoPru rank: top-T patches by the attention they receive from all patches (Jiang et al. 2024)."""

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        kept = top_in_raster_order(signals.received_attn, budget.tokens(signals.num_patches))
        return Selection.from_kept(signals.features, kept)

    def keep_masks(self, signals: Signals, counts: torch.Tensor) -> torch.Tensor:
        return top_k_mask(signals.received_attn, counts)  # the same set as top_in_raster_order at each count


@register("fopru-row")
class FoPruRow(_FoPru):
    """FoPru row: whole grid rows ranked by received attention, keeping contiguous strips (Jiang et al. 2024)."""

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        kept = best_rows(signals.received_attn, signals.grid, budget.tokens(signals.num_patches))
        return Selection.from_kept(signals.features, kept)
