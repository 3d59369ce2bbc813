"""LLaVA-PruMerge and PruMerge+: adaptive (IQR) selection by CLS attention, then key-similarity merging.

Paper: Shang, Cai, Xu, Lee, Yan. "LLaVA-PruMerge: Adaptive Token Reduction for
Efficient Large Multimodal Models", arXiv 2403.15388 (ICCV 2025).
Official code: https://github.com/42Shawn/LLaVA-PruMerge
(llava/model/multimodal_encoder/clip_encoder.py: token_prune_merge_advanced[_plus]).

Algorithm, as the official code runs it, for one image of N patches:
  1. a = CLS row of the LAST vision layer's attention, recomputed as one head over
     the full width: softmax(q_cls . K^T / sqrt(D)) over 1+N keys, CLS column dropped.
  2. Budget (auto): IQR outliers of a, thr = Q3 + 1.5 (Q3 - Q1); k = #(a > thr).
     Keep the top-k patches by a (in descending score order; equal scores: lower index first).
  3. Each kept token i absorbs its 32 nearest patches by cosine similarity of the
     last layer's keys (among all other patches, kept ones included):
     x_i' = x_i + sum_j a_j x_j.
  4. One extra token: sum over every pruned patch of a_j x_j.
PruMerge+ adds spatially uniform patches not already chosen, after the top-k list, then
merges the same way: raster indices 0, s, 2s, ... below N-1 (the official arange(0, 575, s)),
s = int(step / 3), step = int(N / k) (the official int(1 / ratio) with ratio = k / 576,
which equals int(576 / k) for every k). E.g. k = 4 of 64: step 16, s = 5.

Budgets: 'auto' is the IQR rule above. A fixed count T (or ratio) keeps the top
T-1 patches by a plus the extra token (T = 1: the single top patch, merged, no
extra). For PruMerge+ at a fixed T, the IQR/uniform split of the auto rule is
scaled to T-1 (top-k share first, then uniform picks), so the total is exact.

Weights: the official inference (README, "Download Checkpoints") loads a LoRA fine-tuned
LLaVA-1.5 (llava-v1.5-7b-lora-prunemerge, trained with PruMerge in the loop), and the
paper's headline numbers come from such checkpoints. vtc runs PruMerge training-free on
the stock LLaVA weights, so expect results below the paper's headline table.

Deliberate differences from the official code:
  * The official percentile is taken over the whole batch (it effectively
    supports batch size 1); here every image gets its own IQR.
  * k is at least 1 (the official code can keep zero tokens on flat attention).
  * PruMerge+'s stride int(step/3) is 0 for ratios above 1/3 (an error in torch.arange).
    The IQR rule never gets there (at most a quarter of the scores lie above Q3), but
    the fixed-budget split can, so the stride is clamped to 1.
  * ``order="raster"`` is offered to put the kept tokens back in raster order
    (default ``"score"`` keeps the official descending-score order).

Batched: every step runs for the whole batch at once (per-image quantiles, one sort key per
patch that orders top / uniform / fill picks, neighbour top-k over the kept rows of every
image, weighted sums with embedding_bag); the kept lists differ in length per image, so they
are padded to the longest, whose length is read once per batch.
"""

from __future__ import annotations

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register
from .primitives import gather_rows

NEIGHBOURS = 32  # hard-coded in the official code


def iqr_outlier_counts(scores: torch.Tensor) -> torch.Tensor:
    """(B,) number of scores above Q3 + 1.5 IQR in every row of (B, N) (the official adaptive budget), at least 1."""
    scores = scores.double()
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=torch.double, device=scores.device), dim=-1)
    threshold = q3 + 1.5 * (q3 - q1)
    return (scores > threshold[:, None]).sum(dim=-1).clamp(min=1)


def uniform_grid(n: int, stride: torch.Tensor) -> torch.Tensor:
    """(B, n) mask of the raster indices 0, s, 2s, ... < n-1 of PruMerge+, one stride s per image (at least 1)."""
    index = torch.arange(n, device=stride.device)
    return (index < n - 1) & (index % stride.clamp(min=1)[:, None] == 0)


def thinning_ordinals(available: torch.Tensor, wanted: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) ordinals round(linspace(0, available-1, wanted)) per image, padded with ``width``.

    torch.linspace's float32 rule (start + step*i in the first half, end - step*(steps-1-i) in the
    second, step = (end-start)/(steps-1) in float32), so the rounded picks equal the per-image
    ``torch.linspace(...).round()`` (checked for every available <= 600)."""
    i = torch.arange(width, device=available.device)
    end = (available - 1).float()[:, None]
    step = end / (wanted - 1).clamp(min=1).float()[:, None]
    value = torch.where(i < (wanted // 2)[:, None], step * i.float(), end - step * ((wanted - 1)[:, None] - i).float())
    value = torch.where(wanted[:, None] == 1, torch.zeros_like(value), value)  # one step: linspace gives `start`
    return torch.where(i < wanted[:, None], value.round().long(), width)


def first_in_order(mask: torch.Tensor, order: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of the first ``count`` (B,) entries of ``mask`` when walking each row in ``order``."""
    walked = mask.gather(1, order)
    taken = walked & (walked.cumsum(dim=-1) <= count[:, None])
    return torch.zeros_like(mask).scatter_(1, order, taken)


def merge_into_kept(
    features: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, kept: torch.Tensor, neighbours: int = NEIGHBOURS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 for a batch: x_i' = x_i + sum of a_j x_j over the ``neighbours`` patches whose keys are closest to i's.

    ``kept`` (B, K) patch indices (rows past an image's own count may hold any index: their
    outputs are ignored). Returns the merged tokens (B, K, D) and the neighbours (B, K, m).
    """
    b, n, d = features.shape
    rows = torch.arange(b, device=features.device)[:, None]
    features = features.to(torch.promote_types(features.dtype, attn.dtype))  # a_j x_j in float32 for fp16 features
    unit = torch.nn.functional.normalize(keys, dim=-1)
    sim = gather_rows(unit, kept) @ unit.transpose(1, 2)  # (B, K, N): only the kept rows, never N x N
    sim.scatter_(2, kept[:, :, None], -float("inf"))  # a token is not its own neighbour
    nbrs = sim.topk(min(neighbours, n - 1), dim=-1).indices  # (B, K, m)
    flat = (nbrs + rows[:, :, None] * n).reshape(-1, nbrs.shape[-1])  # rows of features.reshape(B*N, D)
    weighted = torch.nn.functional.embedding_bag(
        flat, features.reshape(b * n, d), per_sample_weights=attn.reshape(-1)[flat], mode="sum"
    )
    return gather_rows(features, kept) + weighted.reshape(b, -1, d), nbrs


@register("prumerge")
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
            raise VTCError(f"{self.name}: order must be 'score' or 'raster', got {order!r}")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise VTCError(f"{self.name}: neighbours must be a whole number of at least 1, got {neighbours!r}")
        self.order = order
        self.neighbours = neighbours

    def choose(self, attn: torch.Tensor, budget: Budget) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """For a (B, N) batch: an order key per patch (the kept patches first, in output order), the
        number kept per image (B,), and whether to add the extra token."""
        b, n = attn.shape
        ranked = torch.sort(attn, descending=True, stable=True).indices  # ties: the lower index first
        raster = torch.arange(n, device=attn.device).expand(b, n)
        rank = torch.empty_like(ranked).scatter_(1, ranked, raster)  # each patch's place in `ranked`
        never = torch.full_like(rank, 4 * n)
        if budget.is_auto:
            k = iqr_outlier_counts(attn)
            top = rank < k[:, None]
            if not self.plus:
                return torch.where(top, rank, never), k, True
            extras = uniform_grid(n, (n // k) // 3) & ~top
            return torch.where(top, rank, torch.where(extras, n + raster, never)), k + extras.sum(dim=-1), True
        total = budget.tokens(n)
        slots = total - 1 if total > 1 else 1
        counts = torch.full((b,), slots, dtype=torch.long, device=attn.device)
        if not self.plus:
            return torch.where(rank < slots, rank, never), counts, total > 1
        # PruMerge+ at a fixed budget: the auto rule's top-k / uniform split, scaled to `slots`.
        k_auto = iqr_outlier_counts(attn)
        uniform_auto = (uniform_grid(n, (n // k_auto) // 3) & (rank >= k_auto[:, None])).sum(dim=-1)
        k = (slots * k_auto / (k_auto + uniform_auto)).round().long().clamp(min=1)  # as Python's round: half to even
        top = rank < k[:, None]
        extras = uniform_grid(n, (n // k) // 3) & ~top
        available, room = extras.sum(dim=-1), slots - k
        # thin the uniform picks evenly rather than cutting the bottom rows
        picked = torch.zeros(b, n + 1, dtype=torch.bool, device=attn.device)
        picked.scatter_(1, thinning_ordinals(available, room, n), True)
        ordinal = (extras.cumsum(dim=-1) - 1).clamp(min=0)  # each uniform pick's place among its image's picks
        extras &= (available <= room)[:, None] | picked.gather(1, ordinal)
        fill = first_in_order(~top & ~extras, ranked, room - extras.sum(dim=-1))
        key = torch.where(top, rank, torch.where(extras, n + raster, torch.where(fill, 2 * n + rank, never)))
        return key, counts, total > 1

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        feats, keys, attn = signals.features, signals.keys, signals.cls_attn
        b, n = attn.shape
        key, counts, with_extra = self.choose(attn, budget)
        counts = counts.tolist()  # the one host read per batch: how many patches each image keeps
        width = max(counts)
        kept = key.sort(dim=-1).indices[:, :width]  # (B, K) in output order; rows past counts[b] are padding
        valid = torch.arange(width, device=kept.device) < torch.tensor(counts, device=kept.device)[:, None]
        if self.order == "raster":
            kept = torch.where(valid, kept, n).sort(dim=-1).values.clamp(max=n - 1)
        merged, nbrs = merge_into_kept(feats, keys, attn, kept, self.neighbours)
        sources = torch.cat([kept[:, :, None], nbrs], dim=-1)  # (B, K, 1 + m)
        if with_extra:
            # step 4: one extra token, the attention-weighted sum of every pruned patch
            pruned = torch.ones(b, n + 1, dtype=torch.bool, device=kept.device)
            pruned = pruned.scatter_(1, torch.where(valid, kept, n), False)[:, :n]
            work = torch.promote_types(feats.dtype, attn.dtype)
            extra = (attn * pruned)[:, None, :].to(work) @ feats.to(work)  # (B, 1, D)
            raster = torch.arange(n, device=kept.device)
            pruned_first = torch.where(pruned, raster, n + raster).sort(dim=-1).values  # pruned patches, raster order
        if len(set(counts)) == 1:  # every image keeps as many: the whole batch in one go
            count = counts[0]
            flat, sizes = sources[:, :count].reshape(b, -1), torch.full((b, count), sources.shape[-1], device=kept.device)
            tokens, anchors = merged[:, :count], kept[:, :count]
            if with_extra:
                tokens = torch.cat([tokens, extra.to(tokens.dtype)], dim=1)
                flat = torch.cat([flat, pruned_first[:, : n - count]], dim=1)
                sizes = torch.cat([sizes, torch.full((b, 1), n - count, device=kept.device)], dim=1)
                anchors = torch.cat([anchors, torch.full((b, 1), -1, device=kept.device)], dim=1)
            nothing_kept = torch.empty(b, 0, dtype=torch.long, device=kept.device)
            return Selection.build_batch(
                feats, nothing_kept, merged_tokens=tokens, merged_sources=(flat, sizes), merged_anchors=anchors,
                info={"kept_before_merge": count},
            )
        no_anchor = torch.full((1,), -1, dtype=torch.long, device=kept.device)
        out = []
        for i, count in enumerate(counts):
            tokens, flat, anchors = merged[i, :count], sources[i, :count].reshape(-1), kept[i, :count]
            sizes = torch.full((count,), sources.shape[-1], dtype=torch.long)
            if with_extra:
                tokens = torch.cat([tokens, extra[i]])
                flat = torch.cat([flat, pruned_first[i, : n - count]])
                sizes = torch.cat([sizes, torch.tensor([n - count])])
                anchors = torch.cat([anchors, no_anchor])
            out.append(
                Selection.build(
                    feats[i],
                    torch.empty(0, dtype=torch.long),  # nothing kept as is: every output token is merged
                    merged_tokens=tokens,
                    merged_sources=(flat, sizes),
                    merged_anchors=anchors,
                    info={"kept_before_merge": count},
                )
            )
        return out


@register("prumerge+")
class PruMergePlus(PruMerge):
    """PruMerge+: PruMerge plus spatially uniform patches (about 3x more tokens) (Shang et al. 2024)."""

    plus = True
