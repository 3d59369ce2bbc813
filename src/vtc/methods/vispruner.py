"""VisPruner: important patches by [CLS] attention, then diverse patches by removing near-duplicates.

Paper: Zhang, Cheng, Lu, Zhang, Zhuo, Cao, Guo, She, Zhang. "Beyond Text-Visual Attention:
Exploiting Visual Cues for Effective Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818 (v2;
v1 of the same id is FasterVLM, vtc's ``fastervlm``).
Official code: https://github.com/Theia-4869/VisPruner, Apache-2.0 (its LICENSE file), read at
commit aefa01a: ``LlavaMetaForCausalLM.encode_images`` (llava/model/llava_arch.py) and
``CLIPVisionTower.feature_select`` (llava/model/multimodal_encoder/clip_encoder.py). No code was
copied; tests/test_vispruner.py checks vtc against fixtures made by running that code.

Algorithm, as the official code runs it, for one image of N patches and a budget of T tokens:
  1. Split the budget: T_imp = int(T * important_ratio) important tokens (Python's int of the
     float product: rounded down), T_div = T - T_imp diverse tokens.
  2. score_j = the CLS query's attention to patch j at LLaVA's feature layer (-2: the attention
     inside the layer whose output LLaVA reads), averaged over the heads. Rank the patches by
     descending score: the first T_imp are the important tokens; the other R = N - T_imp, still
     in that descending order, are the residual list.
  3. Remove duplicates from the residual list, in rounds, until T_div remain. A round with
     r = min(8, R - T_div) on the current list (positions 0..R-1):
       a. A = the tokens at even positions, B = those at odd positions (ToMe's bipartite split);
       b. each A-token's score = its largest cosine similarity to any B-token, on the patch
          features at the feature layer (the tower's hidden state that LLaVA projects);
       c. the r A-tokens with the highest scores go (the most duplicated ones);
       d. the new list is the remaining A-tokens by descending score, then every B-token in its
          current order. That order decides the next round's even/odd split.
  4. Output: the T_imp important and T_div diverse patches, in raster order (the official code
     masks the projected sequence). Nothing is merged or added.

Defaults: important_ratio = 0.5 (the default of the official evaluation scripts' --important_ratio;
its README also runs 0.75 at 64 tokens), layer -2, mean over heads. Budgets: a count or a ratio of
N (the method has no dynamic rule, so no 'auto'). Every output token is a kept patch (``KEPT``);
``info`` gives the split (``important``, ``diverse``).

On LLaVA-NeXT the official code keeps T tokens in every crop (base image and each tile) and then
unpads the tiles; vtc's budget is the image's (ranked globally, or per tile with ``per_tile=True``).
On SigLIP towers (no CLS token) the adapter supplies the attention each patch receives instead.

Deliberate differences from the official code:
  * Exact counts where the official loop breaks. Its round indexes the surviving A-tokens
    (ceil(R / 2) - r of them) with a batch index expanded to R // 2 - r columns, which fits when R
    is even and r <= R / 2 (or, by broadcasting, when R is odd and R // 2 - r = 1). Otherwise it
    raises: an odd R, i.e. N - T_imp odd (T = 58 at ratio 0.5 on 576 patches; T = 64 at 0.4), or
    r > R / 2 in the last rounds when T_div < 8 (T = 8 at 0.5). Or, with R odd and R // 2 = r,
    it drops every A-token, one more than r, and can keep T - 1 tokens (T = 56 at 0.84 on 64
    patches keeps 55). vtc runs the same round on any R, with r also capped at the size of A:
    r = min(8, R - T_div, ceil(R / 2)). Always T tokens; identical wherever the official code
    runs as written (the fixtures record both kinds of failure).
  * Ties: the official argsorts are unstable; vtc sorts stably, so equal attention ranks the
    lower patch index first, and equal duplicate scores drop the earlier list position first.
  * Precision: the official code runs the model in fp16; vtc ranks in the model's dtype and takes
    cosines in fp32 (near-ties may break differently). A zero feature vector has cosine 0 to
    every token here (the official division by its norm gives NaN).
  * The similarities come from one (N, N) cosine matrix per image, read by each round (the
    official code multiplies the current A and B tokens every round: the same numbers, for
    N^2 D multiply-adds once instead of about N^3 D / 96 over the rounds, 6x fewer at N = 576).
  * The CLS row is computed from that layer's q/k with SDPA on; the official code runs the
    tower with eager attention and reads the full attention maps.
"""

from __future__ import annotations

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, VTCError, register

DEFAULT_IMPORTANT_RATIO = 0.5  # the official evaluation scripts' default --important_ratio
ROUND_LIMIT = 8  # the official loop removes at most 8 duplicates per round


def split_budget(total: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) token counts: the official int(T * ratio), rounded down, and the rest."""
    important = int(total * important_ratio)
    return important, total - important


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices ranking each row from the highest score down; equal scores keep their order (stable)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def remove_duplicates(similarity: torch.Tensor, residual: torch.Tensor, keep: int) -> torch.Tensor:
    """Step 3 for a batch: ``similarity`` (B, N, N) cosines, ``residual`` (B, R) patch indices in list
    order; returns the (B, keep) survivors in the final list order. One loop step per round, every
    image of the batch at once (all lists have the same length in every round)."""
    batch, n = similarity.shape[:2]
    flat = similarity.reshape(-1)
    image_start = torch.arange(batch, device=residual.device)[:, None] * (n * n)
    while True:
        count = residual.shape[1]
        drop = min(ROUND_LIMIT, count - keep, (count + 1) // 2)
        if drop <= 0:
            return residual
        a, b = residual[:, ::2], residual[:, 1::2]
        # the (B, |A|, |B|) block of cosines, one index_select over the flat matrices (on the CPU a
        # gather along the last dim with an expanded index is slower, most of all for a batch)
        index = (image_start + a * n)[:, :, None] + b[:, None, :]
        score = flat.index_select(0, index.reshape(-1)).view(index.shape).amax(dim=-1)  # (B, |A|)
        survivors = descending(score)[:, drop:]
        residual = torch.cat([a.gather(1, survivors), b], dim=1)


def vispruner_indices(cls_attn: torch.Tensor, features: torch.Tensor, total: int, important_ratio: float) -> torch.Tensor:
    """(B, total) kept patch indices in raster order, for (B, N) attention and (B, N, D) features."""
    important, diverse = split_budget(total, important_ratio)
    ranked = descending(cls_attn)
    kept, residual = ranked[:, :important], ranked[:, important:]
    if diverse > 0:
        if residual.shape[1] > diverse:  # something to remove: only then build the cosine matrix
            unit = torch.nn.functional.normalize(features.float(), dim=-1)
            residual = remove_duplicates(unit @ unit.transpose(1, 2), residual, diverse)
        kept = torch.cat([kept, residual], dim=1)
    return kept.sort(dim=-1).values


def check_ratio(important_ratio) -> float:
    if isinstance(important_ratio, bool) or not isinstance(important_ratio, (int, float)):
        raise VTCError(f"vispruner: important_ratio must be a number in [0, 1], got {important_ratio!r}")
    if not 0 <= important_ratio <= 1:  # False for NaN too
        raise VTCError(f"vispruner: important_ratio must be in [0, 1], got {important_ratio}")
    return float(important_ratio)


@register("vispruner")
class VisPruner(Method):
    """VisPruner: important patches by [CLS] attention plus diverse ones left after removing duplicates (Zhang et al. 2025)."""

    needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN})
    attention = AttentionSpec(layer=-2, heads="mean")
    paper = "arXiv:2412.01818v2 (ICCV 2025)"
    code = "https://github.com/Theia-4869/VisPruner"
    pairwise = True  # one (N, N) cosine matrix per image for the duplicate rounds

    def __init__(self, important_ratio: float = DEFAULT_IMPORTANT_RATIO):
        self.important_ratio = check_ratio(important_ratio)

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        total = budget.tokens(signals.num_patches)
        kept = vispruner_indices(signals.cls_attn, signals.features, total, self.important_ratio)
        important, diverse = split_budget(total, self.important_ratio)
        info = {"important": important, "diverse": diverse}
        return Selection.from_kept(signals.features, kept, info=[dict(info) for _ in range(signals.batch_size)])
