"""FEATHER: prune later and in two stages, score without RoPE, and keep a uniform grid of tokens.

Paper: Endo, Wang, Yeung-Levy. "Feather the Throttle: Revisiting Visual Token Pruning for
Vision-Language Model Acceleration", ICCV 2025, arXiv 2412.13180.
Official code: https://github.com/markendo/FEATHER (prismatic-vlms .../llama2_models.py).

Algorithm, as the official code runs it (prefill only), with N image tokens on a square grid:
  score at a stage before layer K: the LAST prompt token's attention computed from layer
  K-1's input (input_layernorm, q_proj, k_proj) WITHOUT RoPE, softmax over the image keys
  only, mean over heads (RoPE's long-range decay is what made FastV keep the bottom rows).
  stage 1 (before layer 8): the top int(N * (1 - 0.7)) tokens UNION a uniform grid (every
  3rd row and column); stage 2 (before layer 16): the top int(N * 0.3^2) of the current
  tokens (the grid is not protected there). Kept tokens keep their original positions.
Ported to LLaVA-1.5 (the official code targets Prismatic VLMs: SigLIP 27 x 27 tokens right
after BOS, Llama-2). What changed: the image span is found from the image placeholder
tokens (after LLaVA's system prompt) instead of a fixed offset after BOS; the grid is
LLaVA's 24 x 24 (64 uniform tokens with stride 3); stage layers scale with the LLM depth
(8 and 16 of 32). When a vision-side method ran first, or N is not a square, the uniform
grid is skipped (the image tokens no longer form a grid).
Budgets: 'auto' is the official setting (ratio 0.7 pruned per stage). A count T is a
layer-averaged target: the kept fraction per stage is solved (bisection) to match it.
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
        first = min(n, int(n * keep_fraction) + grid)  # upper bound: the grid may overlap the top tokens
        return [Stage(layers[0], max(1, first))] + [Stage(l, max(1, int(n * keep_fraction ** (s + 2)))) for s, l in enumerate(layers[1:])]

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
                chosen = torch.sort(scores, descending=True, stable=True).indices[: min(stage.keep, n)]
            choices.append(Choice(img[chosen].sort().values))
        return choices
