"""FROZEN naive reference (issue 21): the per-image code of vtc.methods.baselines (SpatialPool) as it was before vectorising.

Do not edit: tests/test_vectorised_equal.py checks the batched implementation against it.
"""


from __future__ import annotations

import torch

from vtc.methods.base import Budget, Method, Selection, Signals


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    # The same bin edges as torch's adaptive_avg_pool: [floor(i*size/out), ceil((i+1)*size/out)).
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def pooling_layout(tokens: int, grid: tuple[int, int]) -> list[int]:
    """Columns per row band: ``len(result)`` bands of rows, summing to exactly ``tokens`` cells.

    The band count keeps cells about square (rows ~ sqrt(tokens * h / w)); when
    ``tokens`` factors into that many equal rows this is the regular grid (64 on
    24x24 -> 8 bands of 8), otherwise the bands differ by one column.
    """
    h, w = grid
    rows = min(h, max(-(-tokens // w), round((tokens * h / w) ** 0.5), 1))
    base, extra = divmod(tokens, rows)
    # Spread the wider bands evenly over the image rather than stacking them at the top.
    wide = {round((i + 0.5) * rows / extra - 0.5) for i in range(extra)} if extra else set()
    return [base + (1 if r in wide else 0) for r in range(rows)]


def pooled_regions(total: int, grid: tuple[int, int]) -> list[torch.Tensor]:
    """``total`` groups of raster cells of ``grid``: row bands cut into adaptive-pooling column bins."""
    h, w = grid
    layout = pooling_layout(total, grid)
    regions = []
    for (r0, r1), cols in zip(_bins(h, len(layout)), layout):
        for c0, c1 in _bins(w, cols):
            regions.append((torch.arange(r0, r1)[:, None] * w + torch.arange(c0, c1)[None, :]).reshape(-1))
    return regions


class SpatialPool(Method):
    """Average pooling of the patch grid to exactly the budget's token count.

    The grid is cut into row bands and each band into column bins with torch's
    adaptive-pooling bin edges (bins may overlap by one patch when sizes do not
    divide). For budgets that factor into a near-square grid (64 on 24x24 -> 8x8)
    this is exactly ``adaptive_avg_pool2d``; other budgets (e.g. a prime) get bands
    whose column counts differ by one, so any budget is honoured exactly.
    LLaVA-1.5 ablations and LLaVolta use pooling as the simplest compressor.
    """

    paper = "baseline (LLaVolta, NeurIPS 2024)"

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        n = signals.num_patches
        h, w = signals.grid
        total = budget.tokens(n)
        feats = signals.features[0]
        if total == n:  # nothing to pool
            return Selection.build(feats, torch.arange(n))
        sources = pooled_regions(total, (h, w))
        pooled = torch.stack([feats[src].mean(0) for src in sources])
        return Selection.build(feats, torch.empty(0, dtype=torch.long), merged_tokens=pooled, merged_sources=sources)
