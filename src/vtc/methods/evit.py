"""EViT-style selection: keep the top attentive tokens and fuse the inattentive rest into one token.

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

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register


def fuse_inattentive(features: torch.Tensor, attn: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) the attention-weighted sum of each image's dropped tokens; ``dropped`` (B, R) indices."""
    weights = torch.zeros_like(attn, dtype=torch.float32).scatter_(1, dropped, attn.gather(1, dropped).float())
    return (weights[:, None, :] @ features.float()).to(features.dtype)


@register("evit")
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

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        feats, attn, n = signals.features, signals.cls_attn, signals.num_patches
        total = budget.tokens(n)
        if total == n:
            return Selection.from_kept(feats, torch.arange(n).expand(signals.batch_size, n))
        ranked = torch.sort(attn, dim=-1, descending=True, stable=True).indices  # ties: the lower index first
        kept = ranked[:, : total - 1]
        if self.order == "raster":
            kept = kept.sort(dim=-1).values
        dropped = ranked[:, total - 1 :].sort(dim=-1).values
        fused = fuse_inattentive(feats, attn, dropped)
        one_group = torch.full((signals.batch_size, 1), dropped.shape[1], dtype=torch.long, device=dropped.device)
        return Selection.build_batch(feats, kept, merged_tokens=fused, merged_sources=(dropped, one_group))
