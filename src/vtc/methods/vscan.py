"""VScan: global and local scans with token merging before the LLM, then pruning at its middle layer.

Paper: Zhang et al. "VScan: Rethinking Visual Token Reduction for Efficient Large
Vision-Language Models", TMLR 2026, arXiv 2505.22654.
Official code: https://github.com/Tencent/SelfEvolvingAgent (VScan/, MIT licence per its README):
llava/model/llava_arch.py (``encode_images``, ``window_cls_selection``, ``token_merging``),
llava/model/modeling_llama_x.py (``layer_prune``), qwen/model/qwen2_5_vl_utils.py (``window_selection``).

Algorithm, as the official code runs it on LLaVA-1.5 (24 x 24 patches), for a vision-stage count T:
  1. Signals of one eager CLIP forward: the CLS query's attention over the patches (softmax over CLS +
     patches, CLS column dropped, mean over heads) at encoder layer 5 (``attentions[5]``, the 6th of 24:
     shallow) and at layer 22 (``attentions[-2]``, the feature layer's: deep).
  2. Local scan: L = int(T / 2) tokens by the SHALLOW map, the grid cut into 6 x 6 windows (16 on
     24 x 24), the top L // 16 of each window.
  3. Global scan: the DEEP map with the local picks set to 0, its top T - L.
  4. Merging: the T retained patches (raster order) and the N - T others after the projector; each
     other token joins the retained token of highest cosine similarity (first on ties), and each
     retained token becomes (itself + its joiners) / (1 + joiners). Output: T tokens in raster order.
  5. In the LLM (``layer_prune``), before decoder layer 16 of 32: the last prompt token's attention
     (that layer's input_layernorm, q/k with RoPE, causal softmax in fp32, mean over heads) ranks the
     image tokens; the top Y stay, in their order. The scripts use T = 96, Y = 32 at layer 16.
Budget: the official scripts (LLaVA-1.5 and -NeXT, every benchmark) set T = 96, Y = 32, L = 16, which
the README calls "an average of 64 tokens throughout the 32 layers": the paper states budgets as that
layer average. vtc does the same: a count K (or a ratio r, K = round(r * N)) is the LAYER-AVERAGED
count, split as the scripts split 64: T = round(1.5 K) tokens leave the vision stage (what
``tokens_after`` reports) and Y = round(T / 3) stay from layer L = depth / 2 on, so (T + Y) / 2 = K
(within rounding). 64 -> 96 / 32, 128 -> 192 / 64, 192 -> 288 / 96 (the scripts give only 64; 128
and 192 follow the same split). K above 2N / 3 needs T > N and is refused. The average is K when L is
exactly half the depth (32 layers: 16); on an odd depth L = depth // 2 (3 layers: L = 1, K = 20 ->
30 / 10, an average of 16.7); ``info`` reports ``llm_average_tokens``. ``vtc speed`` times and costs
both stages (T tokens up to layer L, Y after).
Composition: a ``VScan`` object is a vision-side ``Method`` (steps 1-4) that carries its in-LLM stage
(step 5) as ``llm_stage``, an ``LLMMethod``; ``Pipeline`` runs the stage inside the LLM whenever a
method carries one (budget 'auto': the stage's own rule, Y = round(T / 3) of the T it receives). On
its own (``select``) a VScan object is the vision stage. Chaining it with another in-LLM method
(``vscan>fastv``) or text recovery (``vscan+text``: every patch is merged, none is left to recover) is
refused.
Options: ``layer`` (LLM layer, None: depth // 2), ``llm_keep`` (Y / T, 1/3), ``window`` (6),
``local_share`` (L / T, 0.5), ``space`` ('projected': similarity of the projected tokens, the
official space; or 'features').
Deliberate differences from the official code:
  * Local windows on any grid: windows of ``window`` x ``window`` cells, the leftover rows and columns
    joined to the last window (at least one window), and the local scan takes the shallow map's
    tokens in descending order, at most ceil(L / windows) per window, until L: the official Qwen2.5-VL
    rule (``window_selection``). On 24 x 24 with L a multiple of 16 (every budget of the scripts) it
    is the LLaVA rule's set; otherwise the LLaVA rule keeps 16 * (L // 16) and sends fewer than T
    tokens, vtc sends exactly T.
  * Merged tokens are the mean of the members' tower features, then projected (vtc's rule for every
    merge); the official code averages projected tokens. The similarity that assigns them is the
    official one (cosine of projected tokens). Retained tokens nobody joined are Origin.KEPT; the rest
    are Origin.MERGED with their retained patch first in their sources.
  * Ties in the scans go to the lower patch index (torch.topk's order is unspecified); a local pick
    is excluded from the global scan outright (the code zeroes its attention, the same for the
    positive softmax values it reads).
  * CLS rows come from the layers' q/k (SDPA stays on); the official code runs eager attention.
  * In the LLM, kept tokens keep their RoPE positions (the code renumbers them), as every vtc
    in-LLM method; the tower is CLIP's only: towers without a CLS token (SigLIP, Qwen-VL) are refused
    (the official Qwen2.5-VL variant reads received attention at other layers: not built here).
  * LLaVA-NeXT: the scans are spatial, so they run per tile (base crop and each tile's unpadded
    rectangle, a count split in proportion); the official code keeps T per crop before unpadding and
    keeps every newline. Merged tokens go after the kept ones there (the adapter's order for merged
    tokens), and the LLM stage keeps a third of the image tokens it receives, newlines included.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import torch

from .base import AttentionSpec, Budget, Method, Origin, Selection, Signal, Signals, VTCError, register
from .llm_base import Choice, LLMMethod, Stage, top_rows
from .primitives import gather_rows, mask_indices, running_count, top_k_mask

SHALLOW_SHARE = 0.25  # encoder layer 5 of CLIP-L's 24 (``attentions[5]``), as a share of the depth
VISION_SHARE = Fraction(3, 2)  # T = 1.5 K: the scripts' 96 for an average of 64
LLM_KEEP = Fraction(1, 3)  # Y = T / 3: the scripts' 32 of 96


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def window_ids(grid: tuple[int, int], window: int) -> tuple[torch.Tensor, int]:
    """(N,) the window of every raster cell and the window count: ``window``-wide windows, leftover rows
    and columns in the last one, at least one window per side."""
    h, w = grid
    rows, cols = max(1, h // window), max(1, w // window)
    r = torch.arange(h).div(window, rounding_mode="floor").clamp(max=rows - 1)
    c = torch.arange(w).div(window, rounding_mode="floor").clamp(max=cols - 1)
    return (r[:, None] * cols + c[None, :]).flatten(), rows * cols


def local_scan(shallow: torch.Tensor, grid: tuple[int, int], count: int, window: int) -> torch.Tensor:
    """(B, N) bool: ``count`` tokens per image taken in descending ``shallow`` order (ties: lower index), at
    most ceil(count / windows) from any one window."""
    win, windows = window_ids(grid, window)
    limit = -(-count // windows)
    order = torch.sort(shallow, dim=-1, descending=True, stable=True).indices  # (B, N)
    placed = torch.nn.functional.one_hot(win[order], windows)  # (B, N, W): the window of each ranked token
    rank_in_window = (placed.cumsum(1) * placed).sum(-1)  # 1-based rank within its own window
    admitted = rank_in_window <= limit
    taken = admitted & (running_count(admitted) <= count)
    return torch.zeros_like(taken).scatter_(1, order, taken)


def global_scan(deep: torch.Tensor, local: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool: the ``count`` highest ``deep`` scores outside the local picks (ties: lower index)."""
    return top_k_mask(deep.masked_fill(local, float("-inf")), count) & ~local


def nearest_retained(vectors: torch.Tensor, kept: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(B, N - T) for every other token, the position (in ``kept``) of the retained token of highest
    cosine similarity, the first on ties."""
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    sim = gather_rows(unit, rest) @ gather_rows(unit, kept).transpose(1, 2)
    return sim.argmax(-1)


def merge_into_retained(features: torch.Tensor, kept: torch.Tensor, rest: torch.Tensor, join: torch.Tensor):
    """((B, T, D) (retained + joiners) / (1 + joiners) in float32, (B, T) joiner counts)."""
    b, t = kept.shape
    total = gather_rows(features, kept).float()
    total.scatter_add_(1, join[..., None].expand(-1, -1, features.shape[-1]), gather_rows(features, rest).float())
    counts = torch.zeros(b, t, dtype=torch.long).scatter_add_(1, join, torch.ones_like(join))
    return total / (1 + counts)[..., None], counts


def provenance(kept: torch.Tensor, rest: torch.Tensor, join: torch.Tensor, counts: torch.Tensor, n: int):
    """Per image: (source_index (N,), source_sizes (T,), owner (N,)): token t draws on its retained patch,
    then its joiners in raster order; every patch belongs to exactly one token."""
    b, t = kept.shape
    sizes = 1 + counts
    start = sizes.cumsum(1) - sizes  # (B, T)
    order = torch.sort(join, dim=1, stable=True).indices  # joiners grouped by token, raster order within
    joined_to = join.gather(1, order)
    first_joiner = counts.cumsum(1) - counts
    slot = start.gather(1, joined_to) + 1 + torch.arange(rest.shape[1]) - first_joiner.gather(1, joined_to)
    flat = torch.empty(b, n, dtype=torch.long)
    flat.scatter_(1, start, kept).scatter_(1, slot, rest.gather(1, order))
    owner = torch.empty(b, n, dtype=torch.long)
    owner.scatter_(1, kept, torch.arange(t).expand(b, t)).scatter_(1, rest, join)
    return flat, sizes, owner


class VScanMiddleLayer(LLMMethod):
    """VScan's in-LLM stage: before decoder layer L keep round(T * llm_keep) image tokens by the last prompt
    token's attention (that layer's q/k with RoPE, causal softmax, mean over heads)."""

    name = "vscan-llm"
    needs = frozenset({"llm_last_token_attention"})
    supports_auto = True
    budget_meaning = "the stage's own rule: round(llm_keep x the image tokens it receives)"

    def __init__(self, layer: int | None = None, llm_keep: Fraction = LLM_KEEP):
        self.layer, self.llm_keep = layer, llm_keep

    def plan(self, n_image: int, num_layers: int, budget: Budget) -> list[Stage]:
        layer = num_layers // 2 if self.layer is None else self.layer
        self.check_layers((layer,), num_layers, "vscan")
        return [Stage(layer, min(n_image, max(1, round_half_up(n_image * self.llm_keep))))]

    def choose(self, index, stages, ctx):
        last = [torch.tensor([ctx.last_row])] * len(ctx.image_rows)
        rows = ctx.attention(stages[0].layer, ctx.hidden, last)
        return [Choice(top_rows(row[0, img], img, min(s.keep, img.numel()))) for row, img, s in zip(rows, ctx.image_rows, stages)]


@register("vscan")
class VScan(Method):
    """VScan: global + local CLS-attention scans with merging, then middle-LLM-layer pruning (Zhang et al. 2026)."""

    paper = "arXiv:2505.22654 (TMLR 2026)"
    code = "https://github.com/Tencent/SelfEvolvingAgent/tree/main/VScan"
    attention = AttentionSpec(layer=-2, heads="mean", shallow=SHALLOW_SHARE)
    spatial = True  # the local scan's windows read the grid: tiled images run per tile
    pairwise = True  # an (N - T) x T similarity matrix
    budget_meaning = "image tokens per LLM layer on average: 1.5x before the LLM, 0.5x from its middle layer"

    def __init__(self, layer: int | None = None, llm_keep: float = 1 / 3, window: int = 6, local_share: float = 0.5,
                 space: Literal["projected", "features"] = "projected"):
        if space not in ("projected", "features"):
            raise VTCError(f"vscan: space must be 'projected' or 'features', got {space!r}")
        if not 0 < llm_keep <= 1:
            raise VTCError(f"vscan: llm_keep must be in (0, 1], got {llm_keep}")
        if not 0 <= local_share <= 1:
            raise VTCError(f"vscan: local_share must be in [0, 1], got {local_share}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise VTCError(f"vscan: window must be a positive int, got {window!r}")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise VTCError(f"vscan: layer must be an int (an LLM decoder layer) or None, got {layer!r}")
        self.window, self.local_share, self.space = window, local_share, space
        self.llm_keep = Fraction(llm_keep).limit_denominator(1000)
        self.llm_stage = VScanMiddleLayer(layer, self.llm_keep)
        projected = Signal.PROJECTED if space == "projected" else Signal.FEATURES
        self.needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN, Signal.CLS_ATTN_SHALLOW, projected})

    def vision_tokens(self, budget: Budget, n: int) -> int:
        """T for an image of ``n`` patches: round(K * 2 / (1 + llm_keep)) (1.5 K by default)."""
        average = budget.tokens(n)
        return max(1, round_half_up(average * 2 / (1 + self.llm_keep)))

    def check_budget(self, budget: Budget, n: int) -> None:
        super().check_budget(budget, n)
        t = self.vision_tokens(budget, n)
        if t > n:
            most = math.floor(n * (1 + self.llm_keep) / 2)
            raise VTCError(
                f"vscan: a layer average of {budget.tokens(n)} tokens needs {t} tokens from the vision stage, more "
                f"than the image's {n} patches; the most it can average is {most} (budget is a layer average)"
            )

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        return self.scan_and_merge(signals, self.vision_tokens(budget, signals.num_patches))

    def scan_and_merge(self, signals: Signals, t: int) -> list[Selection]:
        """Steps 1-4 for a vision-stage count ``t`` (the official ``visual_token_num``)."""
        n = signals.num_patches
        local_count = int(t * self.local_share)
        local = local_scan(signals.cls_attn_shallow, signals.grid, local_count, self.window)
        retained = local | global_scan(signals.cls_attn, local, t - local_count)
        kept, rest = mask_indices(retained, t), mask_indices(~retained, n - t)
        vectors = signals.projected if self.space == "projected" else signals.features
        join = nearest_retained(vectors, kept, rest)
        tokens, counts = merge_into_retained(signals.features, kept, rest, join)
        flat, sizes, owner = provenance(kept, rest, join, counts, n)
        origin = torch.where(counts > 0, int(Origin.MERGED), int(Origin.KEPT))
        info = {"vision_tokens": t, "local": local_count, "global": t - local_count}
        tokens = tokens.to(signals.features.dtype)
        return [
            Selection(tokens[i], origin[i], owner=owner[i], info=info, source_index=flat[i], source_sizes=sizes[i])
            for i in range(signals.batch_size)
        ]
