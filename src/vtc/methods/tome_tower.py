"""ToMe inside the vision tower: r tokens merged in every CLIP layer, with proportional attention.

Paper: Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman. "Token Merging: Your ViT but Faster", ICLR 2023,
arXiv 2210.09461. Official code: https://github.com/facebookresearch/ToMe, licensed CC-BY-NC 4.0
(non-commercial): this file is written from the paper only (read to understand, nothing copied).

What it does, in each CLIP encoder layer up to LLaVA's feature layer (-2: layers 0..22 of 24), run by the
adapter's in-tower hook (models/tower_loop.py, stage "attention"):
  1. Attention with proportional attention: log(s) of every key's size s added to the logits (paper
     Eq. 1), passed to SDPA as an additive float mask; sizes start at 1 (no mask in the first layer).
  2. Between the attention and the MLP (the paper's place): bipartite soft matching on the layer's keys
     averaged over heads (the paper's metric): A = even positions, B = odd positions of the sequence (CLS
     included, at position 0), each A-token's edge to its most similar B-token (cosine), the r most similar
     edges merged; the CLS never merges (methods/merging.py ``bipartite_match``, shared with ``tome``).
  3. Merge = size-weighted average of the residual-stream states, x <- (s_b x_b + sum s_a x_a) / (s_b +
     sum s_a), sizes added. New sequence: [A-tokens left (in sequence order, CLS first), B-tokens].
  4. The MLP runs on the merged tokens; the next layer repeats from 1.
The feature layer's K patch tokens are the output: a token holding one patch is that patch KEPT, one
holding several is MERGED with its patches as sources (kept patches first in raster order, merged tokens
ordered by their first patch, the after-tower ``tome``'s order).

Budget: a count K or a ratio of the N patches (no 'auto': ToMe has no dynamic rule), ending at exactly K
patch tokens. Schedule (``merge_schedule``): the paper's constant r, R = N - K removals over the D layers
run, r = R // D in every layer and the remainder one more in the first layers. A layer that ends with a
tokens can merge at most a of them (ToMe's limit: half of a layer's tokens, the CLS protected), so where
constant r would break the limit in the last layers, their r is capped and the excess moves to the earlier
layers; a K below ceil(N / 2^D) cannot be reached and is refused. LLaVA-1.5 at 64 tokens: R = 512 over 23
layers, r = 23 in the first six layers and 22 in the other 17.
Options: ``proportional`` (default True): the log-size attention bias; off, sizes still weight the merges.

Deliberate differences from the paper's setting:
  * The tower stops at LLaVA's feature layer (-2), so merging runs in those layers only; the last layer is
    never run (LLaVA discards it).
  * r is fixed by the budget (the paper fixes r and lets the count follow), with the capped schedule
    above; equal similarities merge lower position first (a stable sort).
  * Families: LLaVA-1.5 only. LLaVA-NeXT / OneVision (crops whose tile padding is cut after the tower)
    and Qwen-VL (windowed attention, 2x2 merger, no CLS) refuse: the in-tower hook is not wired for them.
  * Not composable with text recovery (``tome_tower+text``): recovery picks stock feature-layer patches,
    which an in-tower method never computes.
"""

from __future__ import annotations

import math

import torch

from .base import Budget, InTowerMethod, VTCError, register
from .merging import bipartite_match


def merge_schedule(n: int, k: int, depth: int) -> list[int]:
    """Tokens merged in each of ``depth`` layers to go from ``n`` to exactly ``k`` patch tokens (module docstring)."""
    removals = n - k
    if removals and depth == 0:
        raise VTCError(f"tome_tower: no vision layer runs before the feature layer, so {n} tokens cannot become {k}")
    want = [removals // depth + (1 if i < removals % depth else 0) for i in range(depth)] if depth else []
    schedule, carry, after = [0] * depth, 0, k
    for i in reversed(range(depth)):  # a layer ending with `after` tokens merges at most `after`
        schedule[i] = min(want[i] + carry, after)
        carry = want[i] + carry - schedule[i]
        after += schedule[i]
    if carry:
        least = math.ceil(n / 2**depth)
        raise VTCError(
            f"tome_tower: budget {k} cannot be reached: ToMe merges at most half of a layer's tokens, so "
            f"{depth} layers take {n} patch tokens down to {least} at the fewest"
        )
    return schedule


class ToMeReducer:
    """The in-tower hook's reducer (models/tower_loop.py): ToMe's step between attention and MLP."""

    stage = "attention"

    def __init__(self, schedule: list[int], prefix: int, proportional: bool):
        self.schedule, self.prefix, self.size_bias = schedule, prefix, proportional
        self.info = {"r": list(schedule), "proportional": proportional}  # copied into every Selection's info

    def __call__(self, view):
        from ..models.tower_loop import Reduction

        r = self.schedule[view.index]
        if r == 0:
            return None
        metric = view.keys.mean(1)  # (B, T, hd): keys averaged over heads
        src, dst, unm = bipartite_match(metric, r, protect_first=self.prefix == 1, unmerged="position")
        bsz, t = metric.shape[:2]
        b_positions = 1 + 2 * torch.arange(t // 2, device=metric.device).expand(bsz, t // 2)
        return Reduction(torch.cat([2 * unm, b_positions], dim=1), merge_from=2 * src, merge_into=1 + 2 * dst)


@register("tome_tower")
class ToMeTower(InTowerMethod):
    """ToMe inside the vision tower: r merges in every CLIP layer, proportional attention (Bolya et al. 2023)."""

    tower_verb = "merges"
    paper = "arXiv:2210.09461 (ICLR 2023)"
    code = "https://github.com/facebookresearch/ToMe (CC-BY-NC 4.0: implemented from the paper)"
    pairwise = True  # bipartite scores: (T/2) x (T/2) similarities per layer
    tower_note = "every layer to the feature layer, keys (head mean)"

    def __init__(self, proportional: bool = True):
        if not isinstance(proportional, bool):
            raise VTCError(f"tome_tower: proportional must be True or False, got {proportional!r}")
        self.proportional = proportional

    def reducer(self, budget: Budget, num_patches: int, depth: int, prefix: int) -> ToMeReducer:
        """The reducer that takes ``num_patches`` to the budget's count over ``depth`` layers."""
        if prefix > 1:
            raise VTCError(f"tome_tower: protects one CLS token, the tower has {prefix} tokens before the patches")
        budget = Budget.parse(budget)
        self.check_budget(budget, num_patches)
        schedule = merge_schedule(num_patches, budget.tokens(num_patches), depth)
        return ToMeReducer(schedule, prefix, self.proportional)
