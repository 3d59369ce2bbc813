"""ToMe: bipartite soft matching, merging the most similar token pairs by size-weighted averaging.

Paper: Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman. "Token Merging: Your ViT but
Faster", ICLR 2023, arXiv 2210.09461.
Official code: https://github.com/facebookresearch/ToMe (tome/merge.py).

One merging round on a sequence of t tokens with metric vectors m and sizes s
(the number of patches each token stands for; 1 at the start):
  1. Split by alternating position: A = tokens 0, 2, 4, ...; B = tokens 1, 3, 5, ...
  2. For each a in A: its most similar b (cosine of m) and that similarity.
  3. The r A-tokens with the highest similarity are merged into their b; the rest stay
     (equal similarities: the lower index merges first).
  4. Merge = size-weighted average: x_b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a), and
     the same for m; s_b <- s_b + sum s_a.
  5. The new sequence is [unmerged A (by descending similarity), B].
r is at most half the tokens per round (ToMe's limit), so reaching a budget T from N
takes several rounds (576 -> 288 -> 144 -> 72 -> 64 for T = 64).

Where it acts here: after the tower, on LLaVA's feature-layer patches (layer -2), with
that layer's keys averaged over heads as the metric (ToMe's metric), as VLM-pruning
papers run ToMe as a baseline at a fixed output count.
Defaults: metric = keys (head mean, layer -2). ``metric="features"`` uses the features.
Deliberate differences from the official code:
  * ToMe merges r tokens inside every transformer block, with fresh keys per block and
    proportional attention (log s added to the attention logits). Here the rounds run
    back to back after the tower: the metric of a merged token is the size-weighted
    mean of its parts' metrics, and there is no later attention to make proportional.
    In-tower merging would change the features every later layer computes and is not
    offered yet.
  * Output order: patches never merged, in raster order, then merged tokens ordered by
    their first patch (ToMe's [unmerged A, B] order has no spatial meaning; the LLM
    reads sequence order).
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register


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


@register("tome")
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
