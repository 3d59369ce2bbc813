"""FROZEN naive reference (the per-image code before batching, issue 21); tests compare the batched method with it.

VisionZip: dominant tokens by [CLS] attention, plus a few contextual tokens merged by key similarity.

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

from vtc.methods.base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register
from naive.primitives import top_in_raster_order

DOMINANT_SHARE = 54 / 64  # the official 54 + 10 split for 64 tokens


def split_budget(total: int, share: float = DOMINANT_SHARE) -> tuple[int, int]:
    """(dominant, contextual) token counts for a total budget."""
    dominant = min(total, max(1, round(total * share)))
    return dominant, total - dominant


def contextual_targets(remaining: int, count: int) -> torch.Tensor:
    """Positions (within the remaining list) of the contextual targets: every step-th, the first ``count``."""
    step = max(1, remaining // count)
    return torch.arange(0, remaining, step)[:count]


def merge_contextual(
    features: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, count: int, average: bool
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Steps 2-4 on the remaining patches: (C, D) contextual tokens, their sources and their target patches."""
    pos = contextual_targets(remaining.numel(), count)
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool)
    is_target[pos] = True
    targets, others = remaining[is_target], remaining[~is_target]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    assign = (unit[others] @ unit[targets].T).argmax(-1)  # (R - C,) index of each member's target
    sums = torch.zeros(count, features.shape[1], dtype=torch.float32).index_add_(0, assign, features[others].float())
    counts = torch.bincount(assign, minlength=count).float()
    if average:
        tokens = (features[targets].float() + sums) / (counts + 1)[:, None]
    else:
        tokens = features[targets].float() + sums / counts.clamp(min=1)[:, None]
    sources = [torch.cat([targets[j : j + 1], others[assign == j]]) for j in range(count)]
    return tokens.to(features.dtype), sources, targets.tolist()



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

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        feats, n = signals.features[0], signals.num_patches
        total = budget.tokens(n)
        if total == n:
            return Selection.build(feats, torch.arange(n))
        dominant, count = split_budget(total, self.dominant_share)
        cls_token = signals.cls_feature[0:1] if self.keep_cls else None
        patches = dominant - 1 if self.keep_cls else dominant
        kept = top_in_raster_order(signals.cls_attn[0], patches)
        info = {"dominant": dominant, "contextual": count}
        if count == 0:
            return Selection.build(feats, kept, info=info, global_tokens=cls_token)
        remaining = torch.ones(n, dtype=torch.bool)
        remaining[kept] = False
        tokens, sources, anchors = merge_contextual(
            feats, signals.keys[0], remaining.nonzero().squeeze(1), count, self.contextual == "mean"
        )
        return Selection.build(feats, kept, merged_tokens=tokens, merged_sources=sources, merged_anchors=anchors, info=info, global_tokens=cls_token)
