"""FasterVLM: keep the patches the [CLS] token attends to most, before the projector.

Paper: Zhang et al. "[CLS] Attention is All You Need for Training-Free Visual Token
Pruning: Make VLM Inference Faster", arXiv 2412.01818 (v1, Dec 2024).
Official code: https://github.com/Theia-4869/FasterVLM
(llava/model/multimodal_encoder/clip_encoder.py, llava/model/llava_arch.py).

Algorithm, as the official code runs it, for one image of N patches:
  1. score_j = the CLS query's attention to patch j at LLaVA's feature layer (-2),
     averaged over the heads.
  2. Keep the top-T patches; they stay in raster order (the official code masks the
     projected sequence). Nothing is merged and nothing is added.

Defaults: layer -2, mean over heads, the budget's T.
Deliberate differences from the official code:
  * The CLS row is computed from that layer's q/k (SDPA stays on); the official
    code switches the tower to eager attention and reads the full attention maps.
  * The official code projects all N patches and masks afterwards; we gather the T
    patches first and project only those (identical: the projector is token-wise).
"""

from __future__ import annotations

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, register
from .primitives import top_in_raster_order, top_k_mask


@register("fastervlm")
class FasterVLM(Method):
    """FasterVLM: top-T patches by [CLS] attention at the feature layer (Zhang et al. 2024)."""

    needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN})
    attention = AttentionSpec(layer=-2, heads="mean")
    paper = "arXiv:2412.01818"
    code = "https://github.com/Theia-4869/FasterVLM"

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        kept = top_in_raster_order(signals.cls_attn, budget.tokens(signals.num_patches))
        return Selection.from_kept(signals.features, kept)

    def keep_masks(self, signals: Signals, counts: torch.Tensor) -> torch.Tensor:
        return top_k_mask(signals.cls_attn, counts)  # the same set as top_in_raster_order at each count
