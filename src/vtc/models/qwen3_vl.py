"""Qwen3-VL glue (``Qwen3VLForConditionalGeneration``): the Qwen2-VL adapter plus DeepStack.

What is the same as Qwen2-VL (qwen_vl.py, whose rules apply unless said here): native resolution
(patches of p = 16 pixels in the released checkpoints, merged 2 x 2, so an H x W image is one grid of
(H/32) x (W/32) language-model tokens); candidates are the merged tokens in raster order; budgets count
them; M-RoPE positions are the stock ones (kept tokens keep their (t, h, w), a merged token takes the
rounded mean of its sources', the text after the image continues as with all tokens, ``rope_deltas``
set for decoding); video and several images per prompt are refused; text guidance only from the
language-model embedding source. The tower's learned position embeddings (bilinearly interpolated to
each grid) are added before the first block, so they are inside every state vtc reads.

What differs:

- **DeepStack.** Besides the merger's output (the tokens put in the prompt), the tower sends one
  more token per image token for each layer of ``deepstack_visual_indexes``: that layer's 2 x 2
  group through its own merger (norm over the whole group, then MLP); the decoder adds the l-th of
  them to the hidden state of the image positions after its layer l (layers 0 .. L-1).
- **FEATURES of a merged token: the inputs of every merger that builds what the language model
  receives for it**, concatenated: its 2 x 2 group of last-block states, then its 2 x 2 group at
  each DeepStack layer ((1 + L) * 4C wide). Every method merges FEATURES rows by a weighted mean,
  so one merge applies the same weights to the main group and to every DeepStack group, and a kept
  token keeps its rows of all of them: ``project`` splits the row and sends (K, 1 + L, D): the
  stock merger on the main group, and each DeepStack merger on its group, which is exactly the stock
  tokens for a kept token (``none`` equals stock ``generate``; pruning equals masking, DeepStack
  additions included) and "merge the mergers' inputs, then project" for a merged one. The cost:
  methods that compare features (DivPrune, ToMe, PruMerge+, ...) compare these concatenated vectors,
  early-layer groups included, not the last block's alone.
- **Attention signals.** Qwen3-VL's tower attends fully within each image in every block (no
  windows), so ``cls_attn`` (received attention, the CLS substitute) and ``keys`` are read at the
  method's own ``attention.layer``, as on Qwen2-VL: the attention each merged token's four patches
  receive, summed, averaged over every patch query of its image and over heads (or one head of the
  full width, as the method asks), rotary applied as the tower applies it (2-D axial), computed in
  chunks of query rows; keys: the mean of the four patches' raw keys.
- **In-LLM methods** (llm_prune.py) apply the decoder's per-head q/k norms when they recompute
  attention, and gather the DeepStack rows of the kept tokens when they prune before the last
  DeepStack addition; a method that merges rows into new ones there (SparseVLM's recycling) is
  refused, since a new row has no DeepStack feature of its own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import Qwen3VLProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from ..methods.base import Method
from .family import register_family
from .qwen_vl import Qwen2VLAdapter, WithoutVideoProcessor


class ImageOnlyQwen3VLProcessor(WithoutVideoProcessor, Qwen3VLProcessor):
    """The Qwen3-VL processor without its video processor (which needs torchvision)."""

    processor_class = "Qwen3VLProcessor"


@register_family
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's adapter with DeepStack groups in FEATURES and DeepStack tokens sent (module docstring)."""

    name = "qwen3-vl"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    label = "Qwen3-VL"
    modeling = "transformers.models.qwen3_vl.modeling_qwen3_vl"
    processor_type = ImageOnlyQwen3VLProcessor

    def __init__(self, model, text_scorer=None):
        super().__init__(model, text_scorer)
        self.deepstack_mergers = self.tower.deepstack_merger_list
        self.group_width = self.merge**2 * self.patch_width  # 4C: one merger's input

    @classmethod
    def support(cls, method: Method) -> tuple[bool, str]:
        served, how = super().support(method)
        if served and getattr(method, "in_llm", False):
            return True, "in the LLM (3-D rotary rows and DeepStack rows gathered)"
        return served, how

    @contextmanager
    def _capture_features(self, store: dict):
        """The input of each DeepStack merger: the (patches, C) states of its tower layer, tower order."""
        store["deepstack"] = [None] * len(self.deepstack_mergers)

        def keeper(i):
            def keep(module, args):
                store["deepstack"][i] = args[0]
            return keep

        handles = [m.register_forward_pre_hook(keeper(i)) for i, m in enumerate(self.deepstack_mergers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def merger_groups(self, out, store: dict) -> torch.Tensor:
        """(tokens, (1 + L) * 4C) in tower order: the last block's 2 x 2 group, then each DeepStack layer's."""
        states = [out.last_hidden_state, *store["deepstack"]]
        return torch.cat([s.reshape(-1, self.group_width) for s in states], dim=1)

    def send(self, tokens: torch.Tensor) -> torch.Tensor:
        """(K, (1 + L) * 4C) FEATURES rows -> (K, 1 + L, D): the stock merger's token, then each DeepStack merger's."""
        main, *deep = tokens.split(self.group_width, dim=1)
        sent = [self.merger(main.reshape(-1, self.patch_width))]
        sent += [merger(group) for merger, group in zip(self.deepstack_mergers, deep, strict=True)]
        return torch.stack(sent, dim=1)

    @staticmethod
    def image_inputs(projected: list[torch.Tensor]) -> dict:
        """``mm_encoder_outputs`` with the prompt tokens and, per DeepStack layer, the tokens the decoder adds."""
        layers = projected[0].shape[1] - 1 if projected else 0
        return {"image": BaseModelOutputWithDeepstackFeatures(
            pooler_output=[p[:, 0] for p in projected],
            deepstack_features=[[p[:, 1 + l] for p in projected] for l in range(layers)],
        )}
