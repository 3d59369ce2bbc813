"""FROZEN naive reference (the per-image code before batching, issue 21); tests compare the batched method with it.

EViT-style selection: keep the top attentive tokens and fuse the inattentive rest into one token.

Paper: Liang, Ge, Tong, Song, Wang, Xie. "Not All Patches are What You Need: Expediting
Vision Transformers via Token Reorganizations", ICLR 2022, arXiv 2202.07800.
Official code: https://github.com/youweiliang/evit (evit.py).

Algorithm, as the official code runs it, at one reduction point:
  a_j = the CLS query's attention to token j, averaged over heads;
  keep the top-(T-1) tokens by a; the rest are fused into ONE extra token
  x_fused = sum_j a_j x_j (attention-weighted sum, not renormalised).
Output: [kept tokens, fused token] = T tokens. Equal scores: the lower index is kept first.

Where it acts here: once, on LLaVA's feature-layer patches (layer -2), with that
layer's CLS attention, as VLM-pruning papers use EViT as a baseline.
Deliberate differences from the official code:
  * EViT reorganises tokens inside the ViT (layers 4, 7, 10 of DeiT at keep rate 0.7,
    with fine-tuning); a training-free VLM has no fine-tuned tower, so we act once,
    after the tower, at the budget's T.
  * Kept tokens go back into raster order (the official code keeps descending-score
    order, harmless inside a ViT with absolute positions already added; the LLM
    reads sequence order, so ``order="score"`` is offered for the official order).
"""

from __future__ import annotations

from typing import Literal

import torch

from vtc.methods.base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register
from naive.primitives import top_in_raster_order


def fuse_inattentive(features: torch.Tensor, attn: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """(1, D) the attention-weighted sum of the dropped tokens."""
    return (attn[dropped, None].float() * features[dropped].float()).sum(0, keepdim=True).to(features.dtype)



class EViT(Method):
    """EViT-style: top-(T-1) tokens by CLS attention + one attention-weighted fused token (Liang et al. 2022)."""

    needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN})
    attention = AttentionSpec(layer=-2, heads="mean")
    paper = "arXiv:2202.07800 (ICLR 2022)"
    code = "https://github.com/youweiliang/evit"

    def __init__(self, order: Literal["raster", "score"] = "raster"):
        if order not in ("raster", "score"):
            raise VTCError(f"evit: order must be 'raster' or 'score', got {order!r}")
        self.order = order

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        feats, attn, n = signals.features[0], signals.cls_attn[0], signals.num_patches
        total = budget.tokens(n)
        if total == n:
            return Selection.build(feats, torch.arange(n))
        keep = total - 1
        if self.order == "score":
            kept = torch.sort(attn, descending=True, stable=True).indices[:keep]
        else:
            kept = top_in_raster_order(attn, keep)
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[kept] = False
        dropped = dropped.nonzero().squeeze(1)
        fused = fuse_inattentive(feats, attn, dropped)
        return Selection.build(feats, kept, merged_tokens=fused, merged_sources=[dropped])
