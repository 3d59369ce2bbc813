"""SparseVLM: text raters pick which image tokens to keep, progressively, and recycle the dropped ones.

Paper: Zhang et al. "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", ICML 2025, arXiv 2410.04417.
Official code: https://github.com/Gumpest/SparseVLMs (v1.5 / main branch).

Algorithm, as the official code runs it (prefill only):
  1. Raters, once, from the LLM's input embeddings: M = softmax over the text tokens of
     (image embeds . text embeds^T), averaged over the image tokens; the raters are the
     text tokens (after the image) whose score is above the mean.
  2. At each pruning layer l: s_j = the raters' head-mean attention to image token j;
     keep the top n_l (equal scores: the earlier token).
  3. Recycling: of the tokens dropped at this stage, the top m = 30% (+1) by s are
     clustered with density-peaks k-NN (k = c; density exp(-mean squared distance to the k
     nearest, the token itself among them), distance to the nearest denser token, centers
     = the top c of density x distance, c = m // 10 + 1) and each cluster's mean joins the
     kept tokens, right after them.
Stage layers: 2, 6, 15 for 32- and 40-layer LLMs (LLaVA-1.5-7B and 13B: the official code
uses the same layers for both); other depths scale them (round(depth x l / 32)).
Budgets: the fixed-count schedules of the official code, image tokens kept per stage
(their layer average is about the advertised budget): 192 -> (300, 200, 110),
128 -> (303, 110, 36), 96 -> (238, 48, 26), 64 -> (66, 30, 17). A count T is a
layer-averaged target: the nearest schedule's shape is scaled (bisection) until the
average over all layers is T.
``schedule="rank"`` is the original (v1) rule: n_l = int(scale * rank(P) + bias) with P the
raters x image attention block; its per-benchmark scale/bias constants are options.
Deliberate differences from the official code:
  * Stage l is scored with layer l-1's attention (computed from its q/k, SDPA stays on) and
    pruned before layer l runs, so layers 0..l-1 see every token, matching the code's own
    "equal tokens" accounting (2 x 576 + 4 n1 + 9 n2 + 17 n3).
  * Recycled tokens take the original position of their cluster center (the official
    v1.5 code renumbers positions contiguously), and they count inside n_l so budgets
    are exact (the official code keeps n_l and adds the c merged ones on top): the top
    n_l - c are kept and the recycling pool is drawn from ALL the others, so the tokens
    ranked just inside n_l are clustered rather than lost (c is solved so that c is the
    cluster count of that pool).
  * Clustering runs on layer l's input (the official code: layer l's output, as its
    stage l runs layer l first); exact density ties go to the later token (the official
    code adds random noise of 1e-6).
  * Batches of any size (the official code is batch size 1).
  * A stage whose n_l is at least the image tokens present keeps them all (the official
    code keeps min(n_l, present - 1), so it always drops and recycles at least one).
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import Budget, VTCError, register
from .llm_base import Choice, LLMMethod, Stage
from .pyramiddrop import solve_ratio

SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
LAYERS = (2, 6, 15)
OFFICIAL_DEPTHS = (32, 40)  # LLaVA-1.5-7B and 13B: the official code prunes at LAYERS for both


def select_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices (into ``text``) of the text tokens rated above the mean by the image tokens.

    When none is above the mean (every text token rated alike, or a single one), the best one
    (the first of equals) rates alone, so a stage always has a rater.
    """
    relevance = (image.float() @ text.float().T).softmax(dim=-1).mean(0)
    raters = torch.nonzero(relevance > relevance.mean()).squeeze(1)
    return raters if raters.numel() else relevance.argmax().reshape(1)


def density_peaks(x: torch.Tensor, clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN (TCFormer's density-peaks clustering): (cluster label of every row of ``x``, center rows).

    As the official code: distances scaled by sqrt(dim); density = exp(-mean squared distance
    to the k nearest rows, the row itself included); a row's parent distance is to the
    nearest denser row (the largest distance for the densest); centers are the top
    ``clusters`` by density x parent distance (equal products: the earlier row); every row joins
    its nearest center.
    """
    n = x.shape[0]
    dist = torch.cdist(x.float(), x.float(), compute_mode="donot_use_mm_for_euclid_dist") / x.shape[1] ** 0.5
    near = dist.topk(max(1, min(k, n)), largest=False).values
    density = torch.exp(-(near**2).mean(-1))
    rank = torch.arange(n)
    # exact ties (the official code adds random noise): the later row counts as denser
    higher = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (rank[None, :] > rank[:, None]))
    parent = torch.where(higher, dist, torch.full_like(dist, float("inf"))).min(-1).values
    parent = torch.where(torch.isinf(parent), dist.max(), parent)
    centers = torch.sort(density * parent, descending=True, stable=True).indices[:clusters]
    labels = dist[:, centers].argmin(-1)
    labels[centers] = torch.arange(centers.numel())  # a center always joins its own cluster
    return labels, centers


def pool_size(dropped: int) -> int:
    """How many of the dropped tokens are clustered: the top 30% (+1)."""
    return min(dropped, int(0.3 * dropped) + 1)


def recycled_count(n_image: int, keep: int) -> int:
    """Merged tokens c when ``keep`` counts them: the c with c = pool_size(n - (keep - c)) // 10 + 1 (at most keep - 1).

    The top keep - c tokens are kept, the rest are dropped and their best 30% recycled into
    c clusters, so no token ranked inside the budget is lost between the two.
    """
    for c in range(1, keep):
        if pool_size(n_image - keep + c) // 10 + 1 <= c:
            return c
    return max(0, keep - 1)


def recycle(hidden: torch.Tensor, dropped: torch.Tensor, positions: torch.Tensor, clusters: int):
    """``clusters`` merged tokens from the best dropped rows (``dropped`` is ordered best first): (tokens, positions)."""
    cand = dropped[: pool_size(dropped.numel())]
    labels, centers = density_peaks(hidden[cand], clusters, clusters)
    tokens = torch.stack([hidden[cand[labels == j]].mean(0) for j in range(clusters)])
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
        scaled = tuple(max(1, round(num_layers * l / 32)) for l in LAYERS)
        layers = self.layers or (LAYERS if num_layers in OFFICIAL_DEPTHS else scaled)
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
            order = torch.sort(scores, descending=True, stable=True).indices
            n_merged = recycled_count(img.numel(), keep) if self.recycling and keep > 1 else 0
            kept, dropped = order[: keep - n_merged], order[keep - n_merged :]
            merged, positions = recycle(ctx.hidden[b], img[dropped], ctx.positions(b), n_merged) if n_merged else (None, None)
            choices.append(Choice(img[kept].sort().values, merged, positions, {"recycled": n_merged}))
        return choices
