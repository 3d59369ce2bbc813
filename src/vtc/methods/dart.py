"""DART: keep the image tokens that duplicate the pivots least (duplication, not importance).

Paper: Wen et al. "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", EMNLP 2025, arXiv 2502.11494.
Official code: https://github.com/ZichenWen1/DART (llava/model/language_model/modeling_llama_self.py;
read from the author's identical fork xqy1111111/DART, as the original had no snapshot here).

Algorithm, as the official code runs it, once before layer K = 2 (prefill only):
  h = the final RMSNorm applied to layer K-1's output; k = layer K-1's keys (after RoPE,
  all heads concatenated).
  pivots: the 4 image tokens and the 4 text tokens after the image with the largest L1
  norm of k.
  Candidates = image tokens minus the image pivots. For each pivot in turn, the t
  candidates least similar to it (cosine of h) are kept and leave the candidate pool.
  "In turn" is the order in which Python iterates the set of the pivots' sequence
  positions (image pivots then text pivots, each by descending norm, inserted into a
  set), as the official code does; vtc iterates the same kind of set. The positions come
  from vtc's prompt (Hugging Face's LLaVA chat template), not the official one (system
  sentence first), so on the same image the visiting order can still differ.
  Kept = image pivots + the picks. No attention weights are needed at all.
Budget: image tokens kept from layer K on. The official code keeps 4 pivots + 8 t with
t = T // 8 (so "128" keeps 132); here the total is exactly T: t = (T - 4) // 8 for every
pivot and the remainder goes one each to the first pivots.
Deliberate differences: exact budgets (above); batches of any size (the official code is
batch size 1 with a fixed image offset); kept tokens keep their original positions, as
in the official code.
"""

from __future__ import annotations

import torch

from .base import Budget, register
from .llm_base import Choice, LLMMethod, Stage


def duplication_picks(h: torch.Tensor, candidates: torch.Tensor, pivots: list[int], quotas: list[int]) -> torch.Tensor:
    """For each pivot in turn, the ``quota`` candidates least cosine-similar to it; picks leave the pool."""
    unit = torch.nn.functional.normalize(h.float(), dim=-1)
    pool = candidates.clone()
    picks = []
    for pivot, quota in zip(pivots, quotas):
        if quota <= 0 or pool.numel() == 0:
            continue
        sim = unit[pool] @ unit[pivot]
        take = torch.sort(sim, stable=True).indices[: min(quota, pool.numel())]
        picks.append(pool[take])
        left = torch.ones(pool.numel(), dtype=torch.bool)
        left[take] = False
        pool = pool[left]
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


def visiting_order(pivots: list[int], positions: torch.Tensor) -> list[int]:
    """Pivot rows in the order Python iterates the set of their original positions (the official code's loop order)."""
    row_at = {int(positions[row]): row for row in pivots}
    return [row_at[p] for p in set(row_at)]


@register("dart")
class Dart(LLMMethod):
    """DART: duplication-aware selection around key-norm pivots, no attention needed (Wen et al. 2025)."""

    paper = "arXiv:2502.11494 (EMNLP 2025)"
    needs = frozenset({"llm_keys", "llm_hidden_states"})
    code = "https://github.com/ZichenWen1/DART"
    pairwise = False

    def __init__(self, layer: int = 2, image_pivots: int = 4, text_pivots: int = 4):
        self.layer, self.image_pivots, self.text_pivots = layer, image_pivots, text_pivots

    def plan(self, n_image, num_layers, budget: Budget):
        self.check_layers((self.layer,), num_layers, self.name)
        return [Stage(self.layer, budget.tokens(n_image))]

    def choose(self, index, stages, ctx):
        keys = ctx.keys(stages[0].layer - 1, ctx.previous, rope=True)
        h = ctx.final_norm(ctx.hidden)
        choices = []
        for b, (img, txt, stage) in enumerate(zip(ctx.image_rows, ctx.text_rows, stages)):
            norms = keys[b].float().abs().sum(-1)
            n_img_piv = min(self.image_pivots, stage.keep, img.numel())
            img_piv = img[torch.sort(norms[img], descending=True, stable=True).indices[:n_img_piv]]
            txt_piv = txt[torch.sort(norms[txt], descending=True, stable=True).indices[: min(self.text_pivots, txt.numel())]]
            pivots = visiting_order(img_piv.tolist() + txt_piv.tolist(), ctx.positions(b))
            rest = stage.keep - n_img_piv
            base, extra = divmod(rest, max(1, len(pivots)))
            quotas = [base + (1 if i < extra else 0) for i in range(len(pivots))]
            candidates = img[~torch.isin(img, img_piv)]
            picks = duplication_picks(h[b], candidates, pivots, quotas)
            choices.append(Choice(torch.cat([img_piv, picks]).sort().values))
        return choices
