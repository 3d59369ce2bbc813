"""Downsample: run the vision tower on a smaller image, so it produces the budget's token count.

The plain baseline that recent benchmarks found hard to beat: VTC-Bench (arXiv 2510.07143)
and UniPruneBench (arXiv 2511.02650) report that simply lowering the input resolution
rivals many pruning methods at equal token counts.

Algorithm, for a budget of T tokens on an h x w patch grid:
  1. s = ceil(sqrt(T)); the normalised image is resized to
     s x s patches (bilinear, antialiased: resizing commutes with the per-channel
     normalisation) and the tower runs on it with its position embeddings
     interpolated (bicubic, transformers' ``interpolate_pos_encoding``).
  2. If s * s > T (T not a perfect square), the s x s features are average-pooled to
     exactly T with the ``pool`` method's row-band layout (e.g. 128 -> 12 x 12 = 144
     -> 128); perfect squares (64, 144, 196, 256...) need no pooling. When s x s is the
     tower's own grid, or would not fit in it (a non-square grid narrower than s), the
     tower runs at full resolution and its features are pooled to T the same way.
Provenance: each output token's sources are the full-resolution patches its image
region covers, so token maps and budgets refer to the original grid.
Deliberate differences: a training-free tower was never trained at the lower
resolution (the benchmarks' variant is the same; fine-tuned low-resolution models
are out of scope). Cannot be combined with ``+text`` (no full-resolution patch is left).
"""

from __future__ import annotations

import math

import torch

from .base import Budget, Method, Origin, Selection, Signal, Signals, register
from .baselines import _bins, pooled_regions


def input_side(total: int) -> int:
    """The side of the smallest square patch grid with at least ``total`` cells: ceil(sqrt(total))."""
    return math.isqrt(total - 1) + 1


def covered_patches(cell: int, small: tuple[int, int], full: tuple[int, int]) -> torch.Tensor:
    """Full-resolution patches under one cell of the small grid."""
    (sh, sw), (h, w) = small, full
    (r0, r1), (c0, c1) = _bins(h, sh)[cell // sw], _bins(w, sw)[cell % sw]
    return (torch.arange(r0, r1)[:, None] * w + torch.arange(c0, c1)[None, :]).reshape(-1)


@register("downsample")
class Downsample(Method):
    """Downsample: a lower input resolution with interpolated position embeddings (the VTC-Bench baseline)."""

    needs = frozenset({Signal.FEATURES})
    paper = "baseline (VTC-Bench arXiv:2510.07143, UniPruneBench arXiv:2511.02650)"

    def input_grid(self, budget: Budget, grid: tuple[int, int]) -> tuple[int, int] | None:
        side = input_side(budget.tokens(grid[0] * grid[1]))
        return None if side > min(grid) or (side, side) == tuple(grid) else (side, side)

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        full = signals.source_grid or signals.grid
        n = full[0] * full[1]
        total = budget.tokens(n)
        feats = signals.features[0]
        if signals.source_grid is None and total == n:
            return Selection.build(feats, torch.arange(n))
        regions = pooled_regions(total, signals.grid) if feats.shape[0] > total else [torch.tensor([i]) for i in range(total)]
        tokens = torch.stack([feats[r].mean(0) for r in regions])
        sources = [torch.cat([covered_patches(int(c), signals.grid, full) for c in r]).unique() for r in regions]
        owner = torch.full((n,), -1, dtype=torch.long)
        for j, src in enumerate(sources):
            owner[src[owner[src] < 0]] = j
        origin = torch.full((total,), int(Origin.MERGED))
        return Selection(tokens=tokens, origin=origin, sources=sources, owner=owner, info={"input_grid": list(signals.grid)})
