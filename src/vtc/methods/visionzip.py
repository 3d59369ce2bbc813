"""VisionZip: dominant tokens by [CLS] attention, plus a few contextual tokens merged by key similarity.

Paper: Yang et al. "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025, arXiv 2412.04467.
Official code: https://github.com/dvlab-research/VisionZip (visionzip/utils.py, clip_encoder.py).

Algorithm, as the official code runs it, for one image of N patches and a budget of
T = D + C tokens:
  1. Dominant: the CLS token plus the D-1 patches with the highest CLS attention at
     LLaVA's feature layer (-2), summed over heads; CLS first, patches in raster order.
  2. The R = N - (D-1) remaining patches, in raster order. Contextual targets are
     every step-th of them (step = max(1, R // C)), the first C.
  3. Every other remaining patch joins the target whose key (layer -2, averaged over
     heads, L2-normalised) is most similar.
  4. contextual_j = x_target + mean(x of its members): the target plus the mean of
     its members (the code's form; the paper says "merge").
Output: [CLS, dominant patches, contextual tokens].

Defaults: the official split D : C = 54 : 10, scaled to T (64 -> 54 + 10, 128 -> 108 + 20,
192 -> 162 + 30), i.e. D = round(T * 54 / 64), C = T - D.
Options: ``keep_cls=False`` spends the whole dominant share on patches (no CLS
token); ``contextual="mean"`` averages the target with its members instead of the
code's target + mean.
Deliberate differences from the official code:
  * The CLS row and keys come from that layer's q/k (SDPA stays on); the official code
    runs the tower with eager attention and reads full attention maps.
  * The official code runs the last vision layer too; we stop at the feature layer.
  * The fine-tuned variant (VisionZip with a re-trained projector) is out of scope.
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register
from .primitives import gather_rows, group_sums

DOMINANT_SHARE = 54 / 64  # the official 54 + 10 split for 64 tokens


def split_budget(total: int, share: float = DOMINANT_SHARE) -> tuple[int, int]:
    """(dominant, contextual) token counts for a total budget."""
    dominant = min(total, max(1, round(total * share)))
    return dominant, total - dominant


def contextual_targets(remaining: int, count: int) -> torch.Tensor:
    """Positions (within the remaining list) of the contextual targets: every step-th, the first ``count``."""
    step = max(1, remaining // count)
    return torch.arange(0, remaining, step)[:count]


def sum_members(
    features: torch.Tensor, members: torch.Tensor, group: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, D) float32 sums of the features of each group's members and (B, C) member counts;
    ``members`` (B, M) patch indices, ``group`` (B, M) their group in [0, C).

    One index_add over every patch of the batch (patches in no group go to a spare slot): it reads
    the features once, in order, which on the CPU is 2-3x faster than gathering the members first
    or multiplying by a dense (C, N) membership matrix."""
    b, n, d = features.shape
    slot = torch.full((b, n), count, dtype=torch.long, device=features.device).scatter_(1, members, group)
    slot += torch.arange(b, device=features.device)[:, None] * (count + 1)
    slot = slot.reshape(-1)
    sums = group_sums(features.reshape(b * n, d).float(), slot, b * (count + 1))
    counts = torch.bincount(slot, minlength=b * (count + 1)).to(torch.float32)
    return sums.view(b, count + 1, d)[:, :count], counts.view(b, count + 1)[:, :count]


def merge_contextual(
    features: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, count: int, average: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-4 for a batch: ``remaining`` (B, R) ascending patch indices per image.

    Returns (B, C, D) contextual tokens, their target patches (B, C), and their sources flat:
    (B, R) indices, each target followed by its members in raster order, with (B, C) sizes.
    """
    b, r = remaining.shape
    pos = contextual_targets(r, count)
    is_target = torch.zeros(r, dtype=torch.bool)
    is_target[pos] = True
    targets, others = remaining[:, is_target], remaining[:, ~is_target]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    assign = (gather_rows(unit, others) @ gather_rows(unit, targets).transpose(1, 2)).argmax(-1)  # (B, R - C) each member's target
    sums, counts = sum_members(features, others, assign, count)
    target_feats = gather_rows(features, targets).float()
    if average:
        tokens = (target_feats + sums) / (counts + 1)[..., None]
    else:
        tokens = target_feats + sums / counts.clamp(min=1)[..., None]
    # Sources flat: sort (target j, member of j) pairs by 2j (the target) / 2j + 1 (its members), stably.
    group = torch.cat([torch.arange(count).expand(b, count) * 2, assign * 2 + 1], dim=1)
    flat = torch.cat([targets, others], dim=1).gather(1, group.argsort(dim=1, stable=True))
    return tokens.to(features.dtype), targets, flat, counts.long() + 1


@register("visionzip")
class VisionZip(Method):
    """VisionZip: dominant CLS-attention tokens + contextual tokens merged by key similarity (Yang et al. 2025)."""

    attention = AttentionSpec(layer=-2, heads="sum", keys="head_mean")
    paper = "arXiv:2412.04467 (CVPR 2025)"
    code = "https://github.com/dvlab-research/VisionZip"

    def __init__(self, dominant_share: float = DOMINANT_SHARE, keep_cls: bool = True, contextual: Literal["code", "mean"] = "code"):
        if not 0 < dominant_share <= 1:
            raise VTCError(f"visionzip: dominant_share must be in (0, 1], got {dominant_share}")
        if contextual not in ("code", "mean"):
            raise VTCError(f"visionzip: contextual must be 'code' (target + mean) or 'mean', got {contextual!r}")
        self.dominant_share, self.keep_cls, self.contextual = dominant_share, keep_cls, contextual
        base = {Signal.FEATURES, Signal.CLS_ATTN, Signal.KEYS}
        self.needs = frozenset(base | {Signal.CLS_FEATURE} if keep_cls else base)

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        feats, n, batch = signals.features, signals.num_patches, signals.batch_size
        total = budget.tokens(n)
        if total == n:
            return Selection.from_kept(feats, torch.arange(n).expand(batch, n))
        dominant, count = split_budget(total, self.dominant_share)
        patches = dominant - 1 if self.keep_cls else dominant
        ranked = torch.sort(signals.cls_attn, dim=-1, descending=True, stable=True).indices  # ties: lower index
        kept = ranked[:, :patches].sort(dim=-1).values
        cls = signals.cls_feature[:, None, :] if self.keep_cls else None
        info = {"dominant": dominant, "contextual": count}
        if count == 0:
            return Selection.build_batch(feats, kept, info=info, global_tokens=cls)
        remaining = ranked[:, patches:].sort(dim=-1).values
        tokens, targets, flat, sizes = merge_contextual(feats, signals.keys, remaining, count, self.contextual == "mean")
        return Selection.build_batch(
            feats, kept, merged_tokens=tokens, merged_sources=(flat, sizes), merged_anchors=targets, info=info,
            global_tokens=cls,
        )
