"""FEATHER: prune later and in two stages, score without RoPE, and keep a uniform grid of tokens.

Paper: Endo, Wang, Yeung-Levy. "Feather the Throttle: Revisiting Visual Token Pruning for
Vision-Language Model Acceleration", ICCV 2025, arXiv 2412.13180.
Official code: https://github.com/markendo/FEATHER (prismatic-vlms .../llama2_models.py).

Algorithm, as the official code runs it (prefill only), with N image tokens on a square grid:
  score at a stage before layer K: the LAST prompt token's attention computed from layer
  K-1's input (input_layernorm, q_proj, k_proj) WITHOUT RoPE, softmax over the image keys
  only, mean over heads (RoPE's long-range decay is what made FastV keep the bottom rows).
  stage 1 (before layer 8): the top int(N * (1 - 0.7)) tokens UNION a uniform grid (every
  3rd row and column), M1 tokens in all; stage 2 (before layer 16): the top int(M1 * 0.3^2)
  of those M1 (the grid is not protected there). Kept tokens keep their original positions.
  LLaVA-1.5 (N = 576): M1 <= 172 + 64 = 236, stage 2 keeps int(0.09 * M1) <= 21; the plan
  (and ``vtc speed``) counts M1 = 236, a layer average of (8 x 576 + 8 x 236 + 16 x 21) / 32
  = 213.5 image tokens over 32 layers. More than two stages (``layers=``) continue the rule:
  stage s keeps int(f^s x the tokens stage s-1 kept).
Ported to LLaVA-1.5 (the official code targets Prismatic VLMs: SigLIP 27 x 27 tokens right
after BOS, Llama-2). What changed: the image span is found from the image placeholder
tokens (after LLaVA's system prompt) instead of a fixed offset after BOS; the grid is
LLaVA's 24 x 24 (64 uniform tokens with stride 3); stage layers scale with the LLM depth
(8 and 16 of 32). When a vision-side method ran first, or N is not a square, the uniform
grid is skipped (the image tokens no longer form a grid).
Budgets: 'auto' is the official setting (ratio 0.7 pruned per stage). A count T is a
layer-averaged target: the kept fraction f per stage is solved (bisection) to match it,
counting M1 without overlap between the top tokens and the grid (an upper bound).
Deliberate differences from the official code: the image span and grid (above); stage
layers scale with depth; batches of any size; the score is the same row, computed in fp32.
"""

from __future__ import annotations

import math

import torch

from .base import Budget, VTCError, register
from .llm_base import Choice, LLMMethod, Stage, average_tokens
from .pyramiddrop import solve_ratio


def uniform_grid(n: int, stride: int) -> torch.Tensor:
    """Image-token indices on every ``stride``-th row and column of a square grid of n tokens (empty if not square)."""
    side = math.isqrt(n)
    if side * side != n:
        return torch.empty(0, dtype=torch.long)
    cells = torch.arange(n)
    return cells[((cells // side) % stride == 0) & ((cells % side) % stride == 0)]


@register("feather")
class Feather(LLMMethod):
    """FEATHER: two late stages, RoPE-free last-token attention + a uniform token grid (Endo et al. 2025)."""

    paper = "arXiv:2412.13180 (ICCV 2025)"
    needs = frozenset({"llm_last_token_attention_no_rope"})
    code = "https://github.com/markendo/FEATHER"
    supports_auto = True
    budget_meaning = "image tokens per layer, averaged over all decoder layers"

    def __init__(self, layers: tuple[int, ...] | None = None, prune_ratio: float = 0.7, stride: int = 3):
        self.layers, self.prune_ratio, self.stride = (tuple(layers) if layers else None), prune_ratio, stride

    def _plan(self, layers, n, keep_fraction):
        grid = uniform_grid(n, self.stride).numel()
        current = max(1, min(n, int(n * keep_fraction) + grid))  # upper bound: the grid may overlap the top tokens
        stages = [Stage(layers[0], current)]
        for s, layer in enumerate(layers[1:], start=2):  # the official rule: a share of what the previous stage kept
            current = max(1, int(current * keep_fraction**s))
            stages.append(Stage(layer, current, share=keep_fraction**s))
        return stages

    def plan(self, n_image, num_layers, budget):
        layers = self.layers or (round(num_layers * 0.25), round(num_layers * 0.5))
        self.check_layers(layers, num_layers, self.name)
        if budget.is_auto:
            return self._plan(layers, n_image, 1 - self.prune_ratio)
        target = budget.tokens(n_image)
        frac = solve_ratio(lambda r: self._plan(layers, n_image, r), n_image, num_layers, target)
        if frac < 0:
            least = average_tokens(self._plan(layers, n_image, 1e-4), n_image, num_layers)
            raise VTCError(f"feather: a layer average of {target} tokens is below the {least:.0f} that stages at {list(layers)} allow")
        return self._plan(layers, n_image, frac)

    def choose(self, index, stages, ctx):
        layer = stages[0].layer
        last = [torch.tensor([ctx.last_row])] * len(ctx.image_rows)
        rows = ctx.attention(layer - 1, ctx.previous, last, rope=False, keys=ctx.image_rows)
        choices = []
        for row, img, stage in zip(rows, ctx.image_rows, stages):
            scores = row[0]
            n = img.numel()
            if index == 0:
                grid = uniform_grid(n, self.stride)
                top_k = max(0, stage.keep - grid.numel())
                top = torch.sort(scores, descending=True, stable=True).indices[:top_k]
                chosen = torch.unique(torch.cat([top, grid]))
            else:
                keep = stage.keep if stage.share is None else max(1, int(n * stage.share))
                chosen = torch.sort(scores, descending=True, stable=True).indices[: min(keep, n)]
            choices.append(Choice(img[chosen].sort().values))
        return choices
