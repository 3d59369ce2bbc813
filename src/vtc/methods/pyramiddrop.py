"""PyramidDrop: drop image tokens in stages, a fixed fraction each time, ranked by the last instruction token.

Paper: Xing et al. "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247.
Official code: https://github.com/Cooperx521/PyramidDrop (llava/model/modeling_llama_pdrop.py).

Algorithm (prefill only): stages before layers 8, 16, 24; at stage s the image tokens fall
to int(N * lambda^s) (lambda = 0.5: 576 -> 288 -> 144 -> 72). The official scripts use
8, 16, 24 for LLaVA-1.5-7B (32 layers) and 13B (40 layers) alike; vtc does the same for
those depths and scales the layers (depth x 1/4, 1/2, 3/4) for others. The ranking is a
"lightweight attention": the pruning layer's own input_layernorm, q_proj and k_proj with
RoPE, the LAST instruction token's query against all keys, causal softmax (fp32), mean
over heads; the top tokens are kept in their original order.
Budgets: 'auto' is the paper's schedule (lambda = 0.5, 270 image tokens per layer on
average over 32 layers). A count T is a LAYER-AVERAGED target, as the papers compare
PyramidDrop: lambda is solved (bisection) so that the average over all layers equals T
as closely as the integer counts allow; a target below what the first stage layer
permits is refused (move the stages earlier with ``layers=``).
Deliberate differences from the official code:
  * Kept tokens keep their original RoPE positions (the official code renumbers them
    contiguously); ``vtc`` uses one position rule for every in-LLM method.
"""

from __future__ import annotations

import torch

from .base import Budget, VTCError, register
from .llm_base import Choice, LLMMethod, Stage, average_tokens, top_rows


LAYERS = (8, 16, 24)
OFFICIAL_DEPTHS = (32, 40)  # LLaVA-1.5-7B and 13B: the official scripts use LAYERS for both


def geometric_plan(layers: tuple[int, ...], n: int, lam: float) -> list[Stage]:
    return [Stage(layer, max(1, int(n * lam ** (s + 1)))) for s, layer in enumerate(layers)]


def solve_ratio(make_plan, n: int, num_layers: int, target: float, hi: float = 1.0) -> float:
    """The ratio in (0, hi] whose plan's layer-averaged token count is closest to ``target`` (bisection); -1 if none reaches it."""
    lo = 1e-4
    if average_tokens(make_plan(lo), n, num_layers) > target + 0.5:
        return -1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if average_tokens(make_plan(mid), n, num_layers) > target:
            hi = mid
        else:
            lo = mid
    return min((lo, hi), key=lambda r: abs(average_tokens(make_plan(r), n, num_layers) - target))


@register("pyramiddrop")
class PyramidDrop(LLMMethod):
    """PyramidDrop: multi-stage geometric dropping by the last instruction token's attention (Xing et al. 2025)."""

    paper = "arXiv:2410.17247 (CVPR 2025)"
    needs = frozenset({"llm_last_token_attention"})
    code = "https://github.com/Cooperx521/PyramidDrop"
    supports_auto = True
    budget_meaning = "image tokens per layer, averaged over all decoder layers"

    def __init__(self, layers: tuple[int, ...] | None = None, ratio: float = 0.5):
        self.layers, self.ratio = (tuple(layers) if layers else None), ratio

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        scaled = tuple(round(num_layers * f) for f in (0.25, 0.5, 0.75))
        layers = self.layers or (LAYERS if num_layers in OFFICIAL_DEPTHS else scaled)
        self.check_layers(layers, num_layers, self.name)
        return layers

    def plan(self, n_image, num_layers, budget):
        layers = self.stage_layers(num_layers)
        if budget.is_auto:
            return geometric_plan(layers, n_image, self.ratio)
        target = budget.tokens(n_image)
        lam = solve_ratio(lambda r: geometric_plan(layers, n_image, r), n_image, num_layers, target)
        if lam < 0:
            least = average_tokens(geometric_plan(layers, n_image, 1e-4), n_image, num_layers)
            raise VTCError(f"pyramiddrop: a layer average of {target} tokens is below the {least:.0f} that stages at layers "
                           f"{list(layers)} allow; pass earlier layers (e.g. layers=(2, 8, 16))")
        return geometric_plan(layers, n_image, lam)

    def choose(self, index, stages, ctx):
        last = [torch.tensor([ctx.last_row])] * len(ctx.image_rows)
        rows = ctx.attention(stages[0].layer, ctx.hidden, last)
        return [Choice(top_rows(row[0, img], img, min(s.keep, img.numel()))) for row, img, s in zip(rows, ctx.image_rows, stages)]
