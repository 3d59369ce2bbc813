"""SparseVLM: text raters pick which image tokens to keep, progressively, and recycle the dropped ones.

Paper: Zhang et al. "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", ICML 2025, arXiv 2410.04417.
Official code: https://github.com/Gumpest/SparseVLMs (v1.5 / main branch).

Algorithm, as the official code runs it (prefill only):
  1. Raters, once, from the LLM's input embeddings: M = softmax over the text tokens of
     (image embeds . text embeds^T), averaged over the image tokens; the raters are the
     text tokens (after the image) whose score is above the mean.
  2. At each pruning layer l: s_j = the raters' head-mean attention to image token j;
     keep the top n_l.
  3. Recycling: of the tokens dropped at this stage, the top 30% (+1) by s are clustered
     with density-peaks k-NN (density exp(-mean squared distance to the k nearest),
     distance to the nearest denser token, centers = the top c of density x distance,
     c = m // 10 + 1) and each cluster's mean joins the kept tokens.
Budgets: the fixed-count schedules of the official code, image tokens kept per stage at
layers 2, 6, 15 (their layer average is about the advertised budget): 192 -> (300, 200, 110),
128 -> (303, 110, 36), 64 -> (66, 30, 17). A count T is a layer-averaged target: the
nearest schedule's shape is scaled (bisection) until the average over all layers is T.
``schedule="rank"`` is the original (v1) rule: n_l = int(scale * rank(P) + bias) with P the
raters x image attention block; its per-benchmark scale/bias constants are options.
Deliberate differences from the official code:
  * Stage l is scored with layer l-1's attention (computed from its q/k, SDPA stays on) and
    pruned before layer l runs, so layers 0..l-1 see every token, matching the code's own
    "equal tokens" accounting (2 x 576 + 4 n1 + 9 n2 + 17 n3).
  * Recycled tokens take the original position of their cluster center (the official
    v1.5 code renumbers positions contiguously), and they count inside n_l so budgets
    are exact (the official code adds them on top).
  * Batches of any size (the official code is batch size 1).
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import Budget, VTCError, register
from .llm_base import Choice, LLMMethod, Stage, top_rows
from .pyramiddrop import solve_ratio

SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
LAYERS = (2, 6, 15)


def select_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices (into ``text``) of the text tokens rated above the mean by the image tokens."""
    relevance = (image.float() @ text.float().T).softmax(dim=-1).mean(0)
    raters = torch.nonzero(relevance > relevance.mean()).squeeze(1)
    return raters if raters.numel() else relevance.argmax().reshape(1)


def density_peaks(x: torch.Tensor, clusters: int, k: int) -> torch.Tensor:
    """DPC-kNN cluster label of every row of ``x`` (TCFormer's density-peaks clustering)."""
    n = x.shape[0]
    dist = torch.cdist(x.float(), x.float()) / x.shape[1] ** 0.5
    k = max(1, min(k, n - 1))
    near = dist.topk(k + 1, largest=False).values[:, 1:] if n > 1 else dist
    density = torch.exp(-(near**2).mean(-1))
    density = density + torch.arange(n) * 1e-6  # break ties by position, deterministically
    higher = density[None, :] > density[:, None]
    parent = torch.where(higher, dist, torch.full_like(dist, float("inf"))).min(-1).values
    parent = torch.where(torch.isinf(parent), dist.max(), parent)
    centers = torch.sort(density * parent, descending=True, stable=True).indices[:clusters]
    return dist[:, centers].argmin(-1), centers


def recycle(hidden: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, slots: int):
    """Merged tokens from the best-scored dropped rows: (tokens, positions), at most ``slots`` of them."""
    m = int(0.3 * rows.numel()) + 1
    if rows.numel() == 0 or slots <= 0:
        return None, None
    best = torch.sort(scores, descending=True, stable=True).indices[: min(m, rows.numel())]
    cand = rows[best]
    c = min(slots, cand.numel() // 10 + 1)
    labels, centers = density_peaks(hidden[cand], c, c)
    tokens = torch.stack([hidden[cand[labels == j]].mean(0) for j in range(c)])
    return tokens, positions[cand[centers]]


@register("sparsevlm")
class SparseVLM(LLMMethod):
    """SparseVLM: text-rater attention picks image tokens at three layers, dropped ones recycled (Zhang et al. 2025)."""

    paper = "arXiv:2410.04417 (ICML 2025)"
    needs = frozenset({"llm_rater_attention", "llm_input_embeddings"})
    code = "https://github.com/Gumpest/SparseVLMs"
    budget_meaning = "image tokens per layer, averaged over all decoder layers (the official schedules)"

    def __init__(self, layers: tuple[int, ...] | None = None, recycling: bool = True, schedule: Literal["fixed", "rank"] = "fixed",
                 scale: float = 13.5, bias: float = 0.0):
        if schedule not in ("fixed", "rank"):
            raise VTCError(f"sparsevlm: schedule must be 'fixed' or 'rank', got {schedule!r}")
        self.layers, self.recycling, self.schedule, self.scale, self.bias = (tuple(layers) if layers else None), recycling, schedule, scale, bias

    def stage_layers(self, num_layers):
        layers = self.layers or tuple(max(1, round(num_layers * l / 32)) for l in LAYERS)
        layers = tuple(sorted(set(layers)))
        self.check_layers(layers, num_layers, self.name)
        return layers

    def plan(self, n_image, num_layers, budget):
        layers = self.stage_layers(num_layers)
        if self.schedule == "rank":  # counts are decided from the attention rank at each stage
            return [Stage(l, n_image) for l in layers]
        target = budget.tokens(n_image)
        nearest = min(SCHEDULES, key=lambda t: abs(t - target * 576 / n_image))
        shape = [c / 576 for c in SCHEDULES[nearest]][: len(layers)]

        def scaled(r):
            counts, prev = [], n_image
            for f in shape:
                prev = max(1, min(prev, round(n_image * f * r)))
                counts.append(prev)
            return [Stage(l, c) for l, c in zip(layers, counts)]

        ratio = solve_ratio(scaled, n_image, num_layers, target, hi=1 / min(shape))
        if ratio < 0:
            raise VTCError(f"sparsevlm: a layer average of {target} tokens is below what stages at {list(layers)} allow")
        return scaled(ratio)

    def choose(self, index, stages, ctx):
        if index == 0:  # raters from the input embeddings; remembered by original position
            self._raters = [
                ctx.positions(b)[txt[select_raters(ctx.embeds[b, img], ctx.embeds[b, txt])]]
                for b, (img, txt) in enumerate(zip(ctx.image_rows, ctx.text_rows))
            ]
        queries = [torch.nonzero(torch.isin(ctx.positions(b), pos)).squeeze(1) for b, pos in enumerate(self._raters)]
        attention = ctx.attention(stages[0].layer - 1, ctx.previous, queries)
        choices = []
        for b, (a, img, stage) in enumerate(zip(attention, ctx.image_rows, stages)):
            scores = a[:, img].mean(0)
            keep = stage.keep
            if self.schedule == "rank":
                rank = int(torch.linalg.matrix_rank(a[:, img].float()))
                keep = max(1, min(img.numel(), int(self.scale * rank + self.bias)))
            if keep >= img.numel():
                choices.append(Choice(img))
                continue
            dropped = torch.sort(scores, descending=True, stable=True).indices[keep:]
            merged, positions = (None, None)
            if self.recycling and keep > 1:
                merged, positions = recycle(ctx.hidden[b], img[dropped], scores[dropped], ctx.positions(b), keep - 1)
            n_merged = 0 if merged is None else merged.shape[0]
            choices.append(Choice(top_rows(scores, img, keep - n_merged), merged, positions, {"recycled": n_merged}))
        return choices
