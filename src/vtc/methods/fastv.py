"""FastV: after layer K-1, keep the image tokens the last prompt token attends to most.

Paper: Chen et al. "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764.
Official code: https://github.com/pkunlp-icler/FastV

Algorithm, as the official code runs it (prefill only):
  s_j = head-mean softmax attention of layer K-1 from the LAST prompt token to image
  token j (RoPE applied, causal); before layer K runs keep the top-T image tokens by s,
  in their original order; text tokens stay; kept tokens keep their original positions.
Defaults: K = 2 (the paper, and the 64/128/192 comparisons of later papers); budget =
image tokens kept from layer K on (count, or ratio of the image tokens: R = 1 - ratio).
Deliberate differences from the official code:
  * The attention row is recomputed from layer K-1's q/k (SDPA stays on); the official
    code runs that layer with eager attention and reads the full map.
  * Batches of any size (the official code reads sample 0 only, with a fixed image offset).
  * Chosen once, in prefill, and the KV cache keeps only the chosen rows: this is the
    official repository's KV-cache version (its README: "all subsequent decoding tokens
    uniformly attend to the same set of image tokens"). The original FastV evaluation ran
    generate(use_cache=False) and re-chose at every decoding step from the newest token;
    vtc does not offer that (each new token would re-run the whole prompt, and the speed
    that in-LLM pruning is for would be gone) and refuses use_cache=False clearly. The two
    agree on the first generated token, which is all the official multiple-choice
    evaluation (A-OKVQA, max_new_tokens=1) reads.
"""

from __future__ import annotations

import torch

from .base import Budget, register
from .llm_base import Choice, LLMMethod, Stage, top_rows


@register("fastv")
class FastV(LLMMethod):
    """FastV: prune image tokens after layer K-1 by the last prompt token's attention (Chen et al. 2024)."""

    paper = "arXiv:2403.06764 (ECCV 2024)"
    needs = frozenset({"llm_last_token_attention"})
    code = "https://github.com/pkunlp-icler/FastV"

    def __init__(self, layer: int = 2):
        self.layer = layer

    def plan(self, n_image: int, num_layers: int, budget: Budget) -> list[Stage]:
        self.check_layers((self.layer,), num_layers, self.name)
        return [Stage(self.layer, budget.tokens(n_image))]

    def choose(self, index, stages, ctx):
        last = [torch.tensor([ctx.last_row])] * len(ctx.image_rows)
        rows = ctx.attention(stages[0].layer - 1, ctx.previous, last)
        return [Choice(top_rows(row[0, img], img, s.keep)) for row, img, s in zip(rows, ctx.image_rows, stages)]
