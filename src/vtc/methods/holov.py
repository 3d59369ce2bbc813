"""HoloV: spread the budget over crops of the token sequence by their holistic score, then keep the top tokens of each.

Paper: Zou, Lu, Wang, Yan, Lyu, Zheng, Zhang, Hu. "Don't Just Chase 'Highlighted Tokens' in MLLMs:
Revisiting Visual Holistic Context Retention", NeurIPS 2025, arXiv 2510.02912.
Official code: https://github.com/obananas/HoloV, Apache-2.0 (its LICENSE file), read at commit 1d2e65e:
``HoloV`` in llava/model/utils.py (called from ``prepare_inputs_labels_for_multimodal`` in
llava/model/llava_arch.py with the CLS attention of ``CLIPVisionTower.feature_select``) and its twin in
qwen-model-HoloV/utils.py (which also returns the kept positions; called from modeling_qwen2_5_vl.py).
Read to understand; no code was taken from it. tests/test_holov.py checks vtc against fixtures made by
running both official functions (scripts/make_holov_fixtures.py).

Algorithm, as the official code runs it, for one image of N tokens and a budget of K:
  1. a_i = the CLS query's attention to patch i at LLaVA's feature layer (-2), mean over heads (the
     Qwen2.5-VL file: the attention each token receives at the tower's last layer); x_i = the
     projector's output for patch i (the similarities are taken after the projector).
  2. Crops: C = max(1, int(1024 / 576 * N / K)) (the Qwen file's rule; the LLaVA file fixes C = 16 with
     K = 64 on N = 576, the same number). The crops are consecutive runs of the token sequence (raster
     order), not 2-D tiles: N // C tokens each, the first N % C crops one more; empty crops (C > N) are
     skipped.
  3. In a crop of M > 1 tokens: u_i = x_i / (|x_i| + 1e-6); S = u u^T with the diagonal zeroed;
     mu_i = sum_j S_ij / (M - 1); V_i = sum_j (S_ij - mu_i)^2 / (M - 1), the sum over every j of the
     crop, the zeroed diagonal included (paper Eq. 2).
  4. H_i = 1000 a_i + beta * gamma * V_i, gamma = mean_i |1000 a_i| / (mean_i |V_i| + 1e-6), beta = 0.09
     (paper Eq. 3; the 1000 is the code's). The crop's score s_c = mean_i H_i. A crop of one token
     scores its raw attention a_i (not times 1000: the code's special case).
     Since V >= 0, mean_i(beta gamma V_i) = beta mean_i |1000 a_i| (up to the 1e-6): s_c = (1 + beta) 1000
     mean_i a_i, so the variance does not change the quotas; it acts only through ``rank='holistic'``.
  5. Quotas: w_c = s_c^tau / (sum_c' s_c'^tau + 1e-6), tau = 1 (paper Eq. 4); q_c = floor(w_c K); the
     K - sum q_c tokens left go one each to the crops of largest w_c.
  6. Each crop keeps its q_c tokens of highest attention a_i (not H: the paper's Eq. 5 ranks by H),
     highest first; a crop whose quota covers it keeps all its tokens in sequence order.
  7. Output: the crops one after the other, in that order (LLaVA-1.5 sends them so). Nothing merged.

Defaults: the official code's (rule of step 2, beta 0.09, tau 1, ranking by attention, official order,
attention layer -2 with the head mean, similarities on the projected tokens). Budgets: a count or a
ratio of N (no 'auto': the paper has no dynamic rule). ``info``: the crop count and each crop's quota.

Deliberate differences from the official code:
  * Exact K. Where a quota exceeds its crop (a crop with more than M / K of the weight; always at
    K = N unless the weights are equal), the official code keeps the crop and loses the excess, then
    pads the sequence with zero vectors up to K (rows with no patch behind them); with every weight
    zero it keeps only C tokens and pads. vtc follows the paper's stated repair (Sec. 4.1: crops over
    quota donate their surplus to crops with room in proportion to w_c (M_c - q_c), a shortfall goes
    to the crop of highest weight): quotas are capped at the crop size; the missing tokens are
    shared by floor(missing * w_c room_c / sum w room), the rest to the highest-weight crop with
    room (if no crop with room has weight, by room alone); repeated until K (each round fills a crop).
    Identical wherever the official code fills K without padding; a superset of its tokens elsewhere.
  * Ties: equal weights give the extra tokens of step 5 to the lower crop, equal attention keeps the
    lower index (torch.topk's order among ties is unspecified).
  * Precision: scores in fp32 (the official LLaVA run takes the similarities in fp16).
  * On Qwen2-VL/2.5-VL the official file reads the last tower layer's received attention (mean over
    the 4 patches of a merged token, in the tower's window order: not aligned with the raster-order
    tokens on Qwen2.5-VL); vtc's adapter gives the received attention at the full-attention layer of
    ``layer`` (pass ``layer=-1`` for the official last layer), summed over the 4 patches (the scores
    are scale-free: the same selection), in raster order. That file's ratio rounds down (int(N r));
    vtc's ratio rounds (``Budget``). Its image span starts at the <|vision_start|> token, one position
    early (the last image token is never a candidate); vtc chooses among the image tokens. There is no
    official Qwen2-VL or OneVision code; on SigLIP (OneVision) the adapter gives received attention too.
  * LLaVA-NeXT: the official code runs HoloV once over the base crop then the unpadded canvas, as vtc's
    global scope does (``per_tile`` runs it on each part); it drops every image_newline (commented out),
    where vtc's adapter keeps one after each canvas row that kept a token.

Options: ``crops`` ('auto' = step 2's rule, or a number of crops), ``beta``, ``tau``, ``rank``
('attention' = official, 'holistic' = paper Eq. 5), ``order`` ('official' or 'raster'), ``space``
('projected' = official, or 'features'), ``layer`` (the vision layer of the attention).
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register
from .primitives import gather_rows, mask_indices

CROP_RULE = 1024 / 576  # the Qwen file's C = int(1024 / 576 * N / K): 16 crops at 64 of LLaVA-1.5's 576 tokens
ATTENTION_SCALE = 1e3  # the official scale of the attention before it is mixed with the variance
EPSILON = 1e-6  # the official offset in the norms and the two ratios
BETA = 0.09  # the official weight of the diversity term (alpha in the LLaVA file, beta in the Qwen one)


def crop_count(n: int, k: int, crops: int | str = "auto") -> int:
    """How many non-empty crops N tokens are cut into for a budget of K (step 2)."""
    count = max(1, int(CROP_RULE * n / k)) if crops == "auto" else int(crops)
    return min(count, n)  # more crops than tokens: the empty ones are skipped


def crop_layout(n: int, crops: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, m) token index of every crop slot (padding slots point at 0), (C, m) valid slots, (C,) sizes:
    consecutive runs of N // C tokens, the first N % C runs one longer."""
    base, extra = divmod(n, crops)
    sizes = base + (torch.arange(crops, device=device) < extra).long()
    starts = sizes.cumsum(0) - sizes
    slot = torch.arange(base + (extra > 0), device=device)
    valid = slot < sizes[:, None]
    return torch.where(valid, starts[:, None] + slot, 0), valid, sizes


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def holistic_scores(
    attention: torch.Tensor, vectors: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor,
    beta: float = BETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, m) token scores H and (B, C) crop scores (steps 3-4) for (B, N) attention and (B, N, D) vectors."""
    batch, (crops, m) = attention.shape[0], index.shape
    attn = _at_least_fp32(attention)[:, index]  # (B, C, m)
    x = _at_least_fp32(gather_rows(vectors, index.reshape(1, -1).expand(batch, -1))).view(batch, crops, m, -1)
    gram = x @ x.transpose(-1, -2)  # (B, C, m, m): within-crop dot products only, never (N, N)
    norm = gram.diagonal(dim1=-2, dim2=-1).sqrt() + EPSILON  # u_i . u_j = x_i . x_j / ((|x_i| + eps)(|x_j| + eps))
    pairs = valid[:, :, None] & valid[:, None, :] & ~torch.eye(m, dtype=torch.bool, device=index.device)
    sim = gram / (norm[..., :, None] * norm[..., None, :]) * pairs  # diagonal and padding zeroed
    others = (sizes - 1).clamp(min=1)[:, None].to(sim.dtype)  # M - 1 (one-token crops are scored apart)
    mean = sim.sum(-1) / others
    spread = ((sim - mean[..., None]).square() * valid[:, None, :]).sum(-1) / others  # the zero diagonal counts
    scaled = attn * ATTENTION_SCALE
    count = sizes.to(sim.dtype)
    gamma = (scaled.abs() * valid).sum(-1) / count / ((spread.abs() * valid).sum(-1) / count + EPSILON)
    tokens = scaled + beta * spread * gamma[..., None]
    crop = (tokens * valid).sum(-1) / count
    crop = torch.where(sizes == 1, attn[..., 0], crop)  # the official one-token crop: its raw attention
    return tokens.masked_fill(~valid, -torch.inf), crop


def official_quotas(crop_scores: torch.Tensor, k: int, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) weights w and quotas of step 5: floor(w K), then one more for each of the crops of largest w
    until K (ties: the lower crop); may exceed a crop's size, or fall short of K when every weight is 0."""
    power = crop_scores**tau
    weights = power / (power.sum(-1, keepdim=True) + EPSILON)
    quota = (weights * k).floor().long()
    rank = torch.sort(weights, dim=-1, descending=True, stable=True).indices.argsort(-1)  # each crop's place
    return weights, quota + (rank < (k - quota.sum(-1, keepdim=True))).long()


def fill_to_budget(quota: torch.Tensor, weights: torch.Tensor, sizes: torch.Tensor, k: int) -> torch.Tensor:
    """Quotas capped at the crop sizes and summing to K (the paper's repair of overflow and shortfall)."""
    rows = torch.arange(quota.shape[0], device=quota.device)
    share = weights.double().clamp(min=0)
    for _ in range(sizes.numel() + 1):  # every round that does not finish fills at least one crop
        quota = torch.minimum(quota.clamp(min=0), sizes)
        missing = k - quota.sum(-1)
        if not bool((missing > 0).any()):
            return quota
        room = sizes - quota
        priority = share * room
        priority = torch.where(priority.sum(-1, keepdim=True) > 0, priority, room.double())
        total = priority.sum(-1, keepdim=True)  # 0 only for an image already at K (no room left)
        total = torch.where(total > 0, total, 1.0)
        extra = (missing[:, None].clamp(min=0) * priority / total).floor().long()
        extra = torch.where(extra.sum(-1, keepdim=True) <= missing[:, None], extra, 0)  # float rounding guard
        best = share.masked_fill(room == 0, -1.0).argmax(-1)  # the highest weight with room; ties: lower crop
        quota = quota + extra
        quota[rows, best] += (missing - extra.sum(-1)).clamp(min=0)
    raise AssertionError("quotas did not reach the budget")  # unreachable: K <= N


def holov_indices(
    attention: torch.Tensor, vectors: torch.Tensor, k: int, crops: int | str = "auto", beta: float = BETA,
    tau: float = 1.0, rank: str = "attention",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) kept token indices in the official output order, and the (B, C) quotas."""
    n = attention.shape[1]
    index, valid, sizes = crop_layout(n, crop_count(n, k, crops), attention.device)
    tokens, crop = holistic_scores(attention, vectors, index, valid, sizes, beta)
    weights, quota = official_quotas(crop, k, tau)
    quota = fill_to_budget(quota, weights, sizes, k)
    key = tokens if rank == "holistic" else _at_least_fp32(attention)[:, index].masked_fill(~valid, -torch.inf)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # (B, C, m): best first, padding last
    slot = torch.arange(index.shape[1], device=index.device)
    order = torch.where((quota == sizes)[..., None], slot, order)  # a crop kept whole stays in sequence order
    taken = slot < quota[..., None]
    picked = index.expand_as(order).gather(-1, order)  # token ids, crop after crop
    position = mask_indices(taken.flatten(1), k)
    return picked.flatten(1).gather(1, position), quota


def check_options(crops, beta, tau, rank, order, space, layer) -> None:
    def number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value

    if crops != "auto" and (isinstance(crops, bool) or not isinstance(crops, int) or crops < 1):
        raise VTCError(f"holov: crops must be 'auto' or a whole number of crops >= 1, got {crops!r}")
    if not number(beta) or beta < 0 or beta == float("inf"):
        raise VTCError(f"holov: beta must be a finite number >= 0, got {beta!r}")
    if not number(tau) or tau <= 0 or tau == float("inf"):
        raise VTCError(f"holov: tau must be a finite number > 0, got {tau!r}")
    if rank not in ("attention", "holistic"):
        raise VTCError(f"holov: rank must be 'attention' (official code) or 'holistic' (paper), got {rank!r}")
    if order not in ("official", "raster"):
        raise VTCError(f"holov: order must be 'official' or 'raster', got {order!r}")
    if space not in ("projected", "features"):
        raise VTCError(f"holov: space must be 'projected' or 'features', got {space!r}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise VTCError(f"holov: layer must be a vision layer index (an int), got {layer!r}")


@register("holov")
class HoloV(Method):
    """HoloV: the budget shared over crops by attention and similarity variance, top attention per crop (Zou et al. 2025)."""

    paper = "arXiv:2510.02912 (NeurIPS 2025)"
    code = "https://github.com/obananas/HoloV"

    def __init__(
        self,
        crops: int | Literal["auto"] = "auto",
        beta: float = BETA,
        tau: float = 1.0,
        rank: Literal["attention", "holistic"] = "attention",
        order: Literal["official", "raster"] = "official",
        space: Literal["projected", "features"] = "projected",
        layer: int = -2,
    ):
        check_options(crops, beta, tau, rank, order, space, layer)
        self.crops, self.beta, self.tau = crops, float(beta), float(tau)
        self.rank, self.order, self.space = rank, order, space
        self.attention = AttentionSpec(layer=layer, heads="mean")
        self.needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN, Signal.PROJECTED if space == "projected" else Signal.FEATURES})

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        if bool((signals.cls_attn < 0).any()):
            raise VTCError("holov: the attention scores (cls_attn) must be non-negative: they weigh the crops")
        k = budget.tokens(signals.num_patches)
        vectors = signals.projected if self.space == "projected" else signals.features
        kept, quota = holov_indices(signals.cls_attn, vectors, k, self.crops, self.beta, self.tau, self.rank)
        if self.order == "raster":
            kept = kept.sort(dim=-1).values
        info = [{"crops": quota.shape[1], "quotas": q} for q in quota.tolist()]
        return Selection.from_kept(signals.features, kept, info=info)
