"""Reference points every comparison needs: all tokens, a random subset, and spatial average pooling."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .base import Budget, Method, Origin, Selection, Signals, VTCError, register
from .primitives import group_sums


@register("none")
class NoCompression(Method):
    """All N patch tokens, untouched (the full-token baseline).

    Budget: only 'auto', a ratio of 1.0 or a count of N can be honoured; any
    smaller budget is an error rather than a silent full-token run.
    """

    supports_auto = True
    paper = "full-token baseline"

    def check_budget(self, budget: Budget, n: int) -> None:
        if not budget.is_auto and budget.tokens(n) != n:
            raise VTCError(f"method 'none' keeps all {n} tokens; give budget 'auto' (or {n}), not {budget}")

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        b, n = signals.batch_size, signals.num_patches
        return Selection.from_kept(signals.features, torch.arange(n).expand(b, n))


@register("random")
class RandomKeep(Method):
    """A uniformly random subset of the patches, kept in raster order.

    Seeded (``seed``, default 0) so runs are reproducible; image b of a batch uses
    seed + b. UniPruneBench found this a surprisingly strong baseline.
    """

    paper = "baseline (UniPruneBench, arXiv:2511.02650)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        n, k = signals.num_patches, budget.tokens(signals.num_patches)
        # One generator per image (seed + its index in the caller's batch), so batching never changes a draw.
        draws = [torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + signals.index + b))[:k]
                 for b in range(signals.batch_size)]
        return Selection.from_kept(signals.features, torch.stack(draws).sort(dim=-1).values)


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


@dataclass(frozen=True)
class _PoolingPlan:
    """What pooling to ``total`` regions of a grid needs, made once per (total, grid) and shared by every call
    (never modified: each Selection gets copies)."""

    first_region: torch.Tensor  # (N,) the first region of every patch (every patch is in at least one)
    extra_cells: torch.Tensor  # patches that overlapping bins put in a second region too, and those regions
    extra_regions: torch.Tensor
    sizes: torch.Tensor  # (total,) patches per region
    template: Selection  # the provenance, the same for every image (its tokens are empty)


@lru_cache(maxsize=64)
def _pooling_plan(total: int, grid: tuple[int, int]) -> _PoolingPlan:
    regions = pooled_regions(total, grid)
    sizes = torch.tensor([r.numel() for r in regions])
    cells, region_of_cell = torch.cat(regions), torch.repeat_interleave(torch.arange(total), sizes)
    n = grid[0] * grid[1]
    position = torch.arange(cells.numel())
    first = torch.full((n,), cells.numel()).scatter_reduce_(0, cells, position, reduce="amin")
    extra = torch.ones(cells.numel(), dtype=torch.bool)
    extra[first] = False
    nothing = torch.empty(0, dtype=torch.long)
    template = Selection.build(
        torch.zeros(n, 0), nothing, merged_tokens=torch.zeros(total, 0), merged_sources=(cells, sizes)
    )
    return _PoolingPlan(region_of_cell[first], cells[extra], region_of_cell[extra], sizes, template)


@register("pool")
class SpatialPool(Method):
    """Average pooling of the patch grid to exactly the budget's token count.

    The grid is cut into row bands and each band into column bins with torch's
    adaptive-pooling bin edges (bins may overlap by one patch when sizes do not
    divide). For budgets that factor into a near-square grid (64 on 24x24 -> 8x8)
    this is exactly ``adaptive_avg_pool2d``; other budgets (e.g. a prime) get bands
    whose column counts differ by one, so any budget is honoured exactly.
    The regions (and the provenance) depend only on the budget and the grid: they are
    made once, and the whole batch is averaged with index_add, no Python loop over regions.
    LLaVA-1.5 ablations and LLaVolta use pooling as the simplest compressor.
    Its regions are spatial, so on a tiled image (LLaVA-NeXT) it pools each tile's grid.
    """

    paper = "baseline (LLaVolta, NeurIPS 2024)"
    spatial = True

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        n, feats = signals.num_patches, signals.features
        total = budget.tokens(n)
        if total == n:  # nothing to pool
            return Selection.from_kept(feats, torch.arange(n).expand(feats.shape[0], n))
        plan, device = _pooling_plan(total, tuple(signals.grid)), feats.device
        # every patch added once to its first region in place (no gathered copy of the batch), then the few
        # patches that overlapping bins share with a second region
        work = feats.to(torch.promote_types(feats.dtype, torch.float32))  # sums in float32 at least
        b, n, d = feats.shape
        offsets = torch.arange(b, device=device)[:, None] * total  # over the flattened batch: faster than along dim 1
        first = (plan.first_region.to(device) + offsets).reshape(-1)
        sums = group_sums(work.reshape(b * n, d), first, b * total).view(b, total, d)
        if plan.extra_cells.numel():
            sums.index_add_(1, plan.extra_regions.to(device), work.index_select(1, plan.extra_cells.to(device)))
        pooled = sums.div_(plan.sizes.to(sums)[:, None]).to(feats.dtype)
        same = plan.template  # every image has the same provenance: copies of one Selection.build
        return [
            Selection(
                tokens,
                same.origin.clone(),
                owner=same.owner.clone(),
                source_index=same.source_index.clone(),
                source_sizes=same.source_sizes.clone(),
            )
            for tokens in pooled
        ]
