"""FROZEN naive reference (issue 21): the per-image code of vtc.methods.tome as it was before vectorising.

Do not edit: tests/test_vectorised_equal.py checks the batched implementation against it.
"""


from __future__ import annotations

from typing import Literal

import torch

from vtc.methods.base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError


def bipartite_round(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, sources: list[torch.Tensor], r: int):
    """One ToMe round removing ``r`` tokens; returns the new (x, metric, size, sources)."""
    a, b = slice(0, None, 2), slice(1, None, 2)
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = unit[a] @ unit[b].T  # (|A|, |B|)
    best, best_b = scores.max(dim=-1)
    order = torch.sort(best, descending=True, stable=True).indices
    src, unm = order[:r], order[r:]
    dst = best_b[src]
    xa, xb, ma, mb, sa, sb = x[a], x[b], metric[a], metric[b], size[a], size[b]
    new_size = sb.clone().index_add_(0, dst, sa[src])

    def weighted(va, vb):
        total = (vb.float() * sb[:, None]).index_add_(0, dst, va[src].float() * sa[src, None])
        return (total / new_size[:, None]).to(vb.dtype)

    src_a, src_b = sources[0::2], sources[1::2]
    merged_sources = [s.clone() for s in src_b]
    for i, j in zip(src.tolist(), dst.tolist()):
        merged_sources[j] = torch.cat([merged_sources[j], src_a[i]])
    return (
        torch.cat([xa[unm], weighted(xa, xb)]),
        torch.cat([ma[unm], weighted(ma, mb)]),
        torch.cat([sa[unm], new_size]),
        [src_a[i] for i in unm.tolist()] + merged_sources,
    )


def tome_merge(x: torch.Tensor, metric: torch.Tensor, total: int):
    """Rounds of bipartite matching from N tokens down to ``total``: (tokens, sources in ToMe's order)."""
    size = torch.ones(x.shape[0], dtype=torch.float32)
    sources = [torch.tensor([i]) for i in range(x.shape[0])]
    while x.shape[0] > total:
        r = min(x.shape[0] - total, x.shape[0] // 2)
        x, metric, size, sources = bipartite_round(x, metric, size, sources, r)
    return x, sources


class ToMe(Method):
    """ToMe: bipartite soft matching with size-weighted averages, after the tower (Bolya et al. 2023)."""

    attention = AttentionSpec(layer=-2, heads="mean", keys="head_mean")
    paper = "arXiv:2210.09461 (ICLR 2023)"
    pairwise = True  # bipartite scores: (N/2) x (N/2) similarities per round
    code = "https://github.com/facebookresearch/ToMe"

    def __init__(self, metric: Literal["keys", "features"] = "keys"):
        if metric not in ("keys", "features"):
            raise VTCError(f"tome: metric must be 'keys' or 'features', got {metric!r}")
        self.metric = metric
        self.needs = frozenset({Signal.FEATURES, Signal.KEYS} if metric == "keys" else {Signal.FEATURES})

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        feats = signals.features[0]
        metric = signals.keys[0] if self.metric == "keys" else feats
        tokens, sources = tome_merge(feats, metric, budget.tokens(signals.num_patches))
        single = [i for i, s in enumerate(sources) if s.numel() == 1]
        merged = sorted((i for i, s in enumerate(sources) if s.numel() > 1), key=lambda i: int(sources[i].min()))
        kept = torch.tensor([int(sources[i][0]) for i in single], dtype=torch.long).sort().values
        return Selection.build(
            feats,
            kept,
            merged_tokens=tokens[merged] if merged else None,
            merged_sources=[sources[i].sort().values for i in merged],
        )
