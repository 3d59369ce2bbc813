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

Batched: every image has the same token count in every round, so each round runs once for the
whole batch; only the metric (and each patch's current token) goes through the rounds. A merged
token is the size-weighted average of its parts' averages, i.e. the mean of its patches'
features, which is computed once at the end (equal to the round-by-round values to float
rounding; with ``metric="features"`` the metric is the tokens and is used as is).
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register
from .merging import bipartite_match, merge_rows
from .primitives import gather_rows, group_sums


def bipartite_round(metric: torch.Tensor, size: torch.Tensor, place: torch.Tensor, r: int):
    """One ToMe round removing ``r`` tokens from every image of the batch.

    ``metric`` (B, t, Dm) and ``size`` (B, t) of the current tokens; ``place`` (B, N) the current
    token of every patch. Returns the new (metric, size, place)."""
    bsz, t = size.shape
    src, dst, unm = bipartite_match(metric, r)
    size_a, size_b = size[:, 0::2], size[:, 1::2]
    nb, nu = size_b.shape[1], unm.shape[1]
    flat_dst = (dst + torch.arange(bsz, device=dst.device)[:, None] * nb).reshape(-1)  # rows of the flat B-tokens
    size_src = size_a.gather(1, src)
    new_size = size_b.reshape(-1).clone().index_add_(0, flat_dst, size_src.reshape(-1)).reshape(bsz, nb)
    metric_a = metric[:, 0::2]
    weighted_a = gather_rows(metric_a, src).float() * size_src[..., None]
    merged = merge_rows(metric[:, 1::2], size_b, flat_dst, weighted_a, new_size)
    # new order [unmerged A, B]: where every current token goes
    a_goes = torch.empty(size_a.shape, dtype=torch.long, device=unm.device)
    a_goes.scatter_(1, unm, torch.arange(nu, device=unm.device).expand(bsz, nu))
    a_goes.scatter_(1, src, nu + dst)
    goes = torch.empty_like(place[:, :t])
    goes[:, 0::2], goes[:, 1::2] = a_goes, nu + torch.arange(nb, device=unm.device)
    return (
        torch.cat([gather_rows(metric_a, unm), merged], dim=1),
        torch.cat([size_a.gather(1, unm), new_size], dim=1),
        goes.gather(1, place),
    )


def tome_merge(metric: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rounds of bipartite matching from N tokens down to ``total`` for a (B, N, Dm) batch:
    the final metric (B, total, Dm), sizes (B, total) and each patch's token (B, N), in ToMe's order."""
    bsz, n = metric.shape[:2]
    size = torch.ones(bsz, n, dtype=torch.float32, device=metric.device)
    place = torch.arange(n, device=metric.device).expand(bsz, n)
    while size.shape[1] > total:
        t = size.shape[1]
        metric, size, place = bipartite_round(metric, size, place, min(t - total, t // 2))
    return metric, size, place


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

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        feats = signals.features
        bsz, n, d = feats.shape
        total = budget.tokens(n)
        if total == n:  # nothing to merge: every patch kept, in raster order
            return Selection.from_kept(feats, torch.arange(n).expand(bsz, n))
        metric, size, place = tome_merge(signals.keys if self.metric == "keys" else feats, total)
        if self.metric == "features":
            tokens = metric  # the round-by-round weighted averages of the features themselves
        else:  # every token is the mean of its patches' features
            flat_place = (place + torch.arange(bsz, device=place.device)[:, None] * total).reshape(-1)
            work = torch.promote_types(feats.dtype, torch.float32)  # sums in float32 at least, as ToMe's rounds
            sums = group_sums(feats.reshape(bsz * n, d).to(work), flat_place, bsz * total)
            tokens = (sums.reshape(bsz, total, d) / size[..., None]).to(feats.dtype)
        raster = torch.arange(n, device=place.device).expand(bsz, n)
        # kept (one-patch) tokens first, in raster order, then merged tokens ordered by their first patch
        first = torch.full_like(size, n, dtype=torch.long).scatter_reduce_(1, place, raster, reduce="amin")
        out_order = torch.where(size > 1, n + first, first).sort(dim=-1).indices  # (B, total): token at each slot
        slot = torch.empty_like(out_order).scatter_(1, out_order, torch.arange(total, device=place.device).expand(bsz, total))
        return Selection.from_partition(gather_rows(tokens, out_order), slot.gather(1, place), size.gather(1, out_order))
