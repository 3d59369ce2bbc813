"""FROZEN naive reference (issue 21): the per-image code of vtc.methods.prumerge as it was before vectorising.

Do not edit: tests/test_vectorised_equal.py checks the batched implementation against it.
"""


from __future__ import annotations

import torch

from vtc.methods.base import AttentionSpec, Budget, Method, Selection, Signal, Signals

NEIGHBOURS = 32  # hard-coded in the official code


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """Number of scores above Q3 + 1.5 IQR (the official adaptive budget), at least 1."""
    q1, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.double))
    threshold = q3 + 1.5 * (q3 - q1)
    return max(1, int((scores.double() > threshold).sum()))


def merge_into_kept(
    features: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, kept: torch.Tensor, neighbours: int = NEIGHBOURS
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Step 3: x_i' = x_i + sum of a_j x_j over the ``neighbours`` patches whose keys are closest to i's."""
    unit = torch.nn.functional.normalize(keys, dim=-1)
    sim = unit[kept] @ unit.T  # (k, N): only the kept rows, never N x N
    sim[torch.arange(kept.numel()), kept] = -float("inf")  # a token is not its own neighbour
    nbrs = sim.topk(min(neighbours, features.shape[0] - 1), dim=-1).indices  # (k, m)
    weighted = attn[nbrs, None] * features[nbrs]  # (k, m, D)
    merged = features[kept] + weighted.sum(dim=1)
    sources = [torch.cat([kept[i : i + 1], nbrs[i]]) for i in range(kept.numel())]
    return merged, sources


def extra_token(features: torch.Tensor, attn: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Step 4: the attention-weighted sum of every pruned patch."""
    return (attn[pruned, None] * features[pruned]).sum(dim=0, keepdim=True)


def uniform_extras(n: int, chosen: torch.Tensor, stride: int) -> torch.Tensor:
    """PruMerge+: raster indices 0, stride, 2*stride, ... < n-1 that are not already chosen."""
    grid = torch.arange(0, n - 1, max(1, stride))
    return grid[~torch.isin(grid, chosen)]


class PruMerge(Method):
    """LLaVA-PruMerge: IQR-adaptive CLS-attention selection + key-similarity merge (Shang et al. 2024)."""

    needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN, Signal.KEYS})
    attention = AttentionSpec(layer=-1, heads="single", keys="full")
    supports_auto = True
    paper = "Shang et al., arXiv:2403.15388"
    code = "https://github.com/42Shawn/LLaVA-PruMerge"
    plus = False

    def __init__(self, order: str = "score", neighbours: int = NEIGHBOURS):
        if order not in ("score", "raster"):
            raise ValueError(f"order must be 'score' or 'raster', got {order!r}")
        self.order = order
        self.neighbours = neighbours

    def choose(self, attn: torch.Tensor, budget: Budget) -> tuple[torch.Tensor, bool]:
        """Indices of the patches to keep (before merging) and whether to add the extra token."""
        n = attn.numel()
        ranked = torch.sort(attn, descending=True, stable=True).indices  # ties: the lower index first
        if budget.is_auto:
            k = iqr_outlier_count(attn)
            top = ranked[:k]
            if self.plus:
                top = torch.cat([top, uniform_extras(n, top, int(n / k) // 3)])
            return top, True
        total = budget.tokens(n)
        slots = total - 1 if total > 1 else 1
        if not self.plus:
            return ranked[:slots], total > 1
        # PruMerge+ at a fixed budget: the auto rule's top-k / uniform split, scaled to `slots`.
        k_auto = iqr_outlier_count(attn)
        uniform_auto = uniform_extras(n, ranked[:k_auto], int(n / k_auto) // 3)
        k = max(1, round(slots * k_auto / (k_auto + uniform_auto.numel())))
        top = ranked[:k]
        extras = uniform_extras(n, top, int(n / k) // 3)
        if extras.numel() > slots - k:  # thin the uniform picks evenly rather than cutting the bottom rows
            extras = extras[torch.linspace(0, extras.numel() - 1, slots - k).round().long()]
        fill = ranked[~torch.isin(ranked, torch.cat([top, extras]))][: slots - k - extras.numel()]
        return torch.cat([top, extras, fill]), total > 1

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        feats, keys, attn = signals.features[0], signals.keys[0], signals.cls_attn[0]
        kept, with_extra = self.choose(attn, budget)
        if self.order == "raster":
            kept = kept.sort().values
        merged, sources = merge_into_kept(feats, keys, attn, kept, self.neighbours)
        anchors = kept.tolist()
        if with_extra:
            pruned = torch.ones(feats.shape[0], dtype=torch.bool)
            pruned[kept] = False
            pruned = pruned.nonzero().squeeze(1)
            merged = torch.cat([merged, extra_token(feats, attn, pruned)])
            sources.append(pruned)
            anchors.append(-1)
        return Selection.build(
            feats,
            torch.empty(0, dtype=torch.long),
            merged_tokens=merged,
            merged_sources=sources,
            merged_anchors=anchors,
            info={"kept_before_merge": int(kept.numel())},
        )


class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus spatially uniform patches (about 3x more tokens) (Shang et al. 2024)."""

    plus = True
