"""VisionTrim: dominant tokens by global and local attention, plus text-guided complement tokens merged from the rest.

Paper: Yu, Li, Qu, Wang, Chen, Zhu. "VisionTrim: Unified Vision Token Compression for Training-Free MLLM
Acceleration", ICLR 2026, arXiv 2601.22674.
Official code: https://github.com/hanxunyu/VisionTrim, Apache-2.0 (its LICENSE file). The code was
published in commit 88063ae and deleted from the default branch by commit 5e299c0 ("fixed", 2026-02-24):
the branch head holds only the README, scripts and data. It was read at commit 0ced4cb:
``CLIPVisionTower.token_prune_visiontrim`` in llava/model/multimodal_encoder/clip_encoder.py, called by
``LlavaMetaForCausalLM.encode_images`` (llava/model/llava_arch.py) with the question as ``original_qs``.
No code was copied; tests/test_visiontrim.py checks vtc against fixtures made by running that function.

The two modules, as the official LLaVA-1.5 code runs them, for one image of N patches, T = T_d + T_t tokens:
  DVTS (Dominant Vision Token Selection), in the vision tower:
  1. A = the tower's attention at LLaVA's feature layer -2 (the layer whose output LLaVA reads), mean
     over the heads. g_j = A[CLS, j] (global view); l_j = sum_{i != j} A[i, j] / (N - 1) over the patch
     queries i, the diagonal excluded (the attention patch j receives from the other patches).
  2. score = 0.5 g / ||g|| + 0.5 l / ||l|| (L2 norms over the N patches); the T_d highest are kept,
     in raster order.
  TGVC (Text-Guided Vision Complement), in the vision tower too:
  3. The question through CLIP's text tower: every token's final state (BOS and EOS included), each
     through text_projection and normalised: t_1..t_M. Every patch state x_j (feature layer -2) through
     CLIP's visual_projection WITHOUT post_layernorm: v_j = P x_j, v^_j = v_j / ||v_j||.
  4. Among the N - T_d other patches (raster order): relevance_j = mean_m s cos(t_m, v_j) (s = CLIP's
     logit scale); the T_t highest are the targets, in raster order; the rest are to be merged.
  5. Three rounds (the official ``vtc_times = 3``): each rest patch h goes to the target
     k = argmax_k sum_m (v^_h . t_m)(t_m . v^_k) s^2 (divided by the row's norm: the argmax is unchanged),
     the first target on ties; every target adds the MEAN of the patches assigned to it this round
     (x_k <- x_k + mean x_h; nothing when none is), and its v^_k is recomputed from the new x_k.
  6. Output: the T_d dominant patches, then the T_t complement tokens (the updated targets).

  Also in the official code, computed but unused: the paper's local token affinity (LTAM, a 3x3-window
  kernel over features and positions) and its adaptive variance weighting (``combine_importance``):
  their result is overwritten by step 2's score before the top-k, so vtc leaves them out. A text-guided
  merge inside the language model (attention of layer 0, 81 tokens) is commented out in
  llava_llama.py: left out too (vtc's in-LLM methods are separate methods).

vtc's signals: FEATURES (x), CLS_ATTN (g) and RECEIVED_ATTN (l, ``AttentionSpec(received="others")``:
the diagonal excluded) at layer -2 with the heads averaged; TEXT_SIM read per text token
(``TextSpec(per_token=True, patch_states="feature", post_layernorm=False)``): for every patch the CLIP
scorer gives v_j and u_j = (v_j . t_m)_m, zero-padded (see base.TextSpec). Step 5 needs v of an updated
target: visual_projection is linear without bias, so v and u of x_k + mean x_h are v_k + mean v_h and
u_k + mean u_h, exactly what the official code recomputes. With the LLM-embedding text source
(``text_source="llm"``, the only one on LLaVA-OneVision and Qwen-VL) v_j is the projector's output and
t_m the question's content tokens in the LM's embedding table; the projector is not linear, so there
an updated target's v is the mean-updated projected vector, not the projector of the updated feature.

Defaults: T_t = int(T * complement_ratio), rounded down, complement_ratio = 0.25 (the official
defaults are ``DVTS_token_num=48, TGVC_token_num=16`` for 64 tokens; the evaluation scripts take both
counts as arguments); T_d = T - T_t; rounds = 3; alpha = 0.5. complement_ratio = 0 is DVTS alone (no
text needed; it composes with Recoverable Compression's text recovery: ``visiontrim+text``). With TGVC on,
``visiontrim+text`` is refused: the method is text-guided itself and merges every patch it does not keep.
Budgets: a count or a ratio of N (no dynamic rule, so no 'auto'). Exact T tokens.
Provenance: dominant tokens are ``KEPT``; each complement token is ``MERGED``, built around its target
patch (its anchor, which it owns) with every patch assigned to it in any round as further sources (a
target that received nothing is a merged token of one source, itself: its value is that patch's).

Deliberate differences from the official code:
  * Ties: the official ``torch.topk`` order on equal scores is unspecified; vtc takes the lower patch
    index first (stable sorts), in both top-k steps. Argmax ties go to the first target, as in the code.
  * A batch: the official code tokenises a batch of questions with padding and averages over the padded
    positions too (its evaluation runs one question at a time); vtc scores every image with its own
    question's tokens only (zero-padded columns change no rank and no assignment).
  * When every score of a rest patch against the targets is zero (e.g. a zero text-token vector) the
    official row normalisation divides by zero (NaN, argmax of NaN); vtc assigns it to the first target.
    Zero vectors are normalised to zero (cosine 0), never to NaN.
  * Precision: the official code runs in fp16; vtc scores in fp32 (near-ties may break differently).
  * LLaVA-NeXT: the official code compresses every crop (base and tiles) to T tokens (and its LLaVA-NeXT
    path calls the tower without the question, so TGVC cannot run there as published); vtc ranks all of
    an image's unpadded candidates together for an exact count (or per tile with ``per_tile``).
  * SigLIP and Qwen-VL towers have no CLS token: there the adapter gives the received attention for g
    too, so the DVTS score is the received attention alone (on Qwen-VL a merged 2x2 token's is the sum of
    its four patches', each leaving out only its own attention to itself).
"""

from __future__ import annotations

import torch

from .base import AttentionSpec, Budget, Method, Selection, Signal, Signals, TextSpec, VTCError, register
from .primitives import gather_rows, mask_indices, top_k_mask

DEFAULT_COMPLEMENT_RATIO = 0.25  # 16 of 64 tokens: the official defaults DVTS_token_num=48, TGVC_token_num=16
DEFAULT_ROUNDS = 3  # the official vtc_times, hard-coded
DEFAULT_ALPHA = 0.5  # the official weight of the CLS attention against the received attention
# The official reading of CLIP: every question token's projected state against visual_projection of the
# feature-layer patch states, without post_layernorm.
TEXT = TextSpec(per_token=True, patch_states="feature", post_layernorm=False)


def split_budget(total: int, complement_ratio: float) -> tuple[int, int]:
    """(dominant, complement) token counts: int(T * ratio) complement tokens, rounded down, the rest dominant."""
    complement = int(total * complement_ratio)
    return total - complement, complement


def dominance(cls_attn: torch.Tensor, received_attn: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """(B, N) DVTS score (step 2): alpha * g/||g|| + (1 - alpha) * l/||l||, L2 norms over each image's patches."""
    unit = lambda s: torch.nn.functional.normalize(s.float(), dim=-1)  # noqa: E731
    return alpha * unit(cls_attn) + (1 - alpha) * unit(received_attn)


def check_text_sim(text_sim: torch.Tensor) -> None:
    """A per-token TEXT_SIM is (B, N, 2, W): each patch's vector in the text space, then its dots with the tokens."""
    if text_sim.dim() != 4 or text_sim.shape[2] != 2:
        raise VTCError(
            f"visiontrim needs TEXT_SIM per text token, shape (B, N, 2, W) (TextSpec(per_token=True)), "
            f"got shape {tuple(text_sim.shape)}"
        )


def token_columns(u: torch.Tensor) -> torch.Tensor:
    """``u`` without its trailing all-zero columns (the padding past the longest question): the same dots, less work."""
    used = u.ne(0).flatten(0, -2).any(0).nonzero()
    return u[..., : int(used.max()) + 1 if used.numel() else 1]


def unit_scores(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u / ||v||: each row's dots with the unit text tokens, as cosines (a zero vector scores 0)."""
    return u / v.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)


def complement(
    features: torch.Tensor, text_sim: torch.Tensor, others: torch.Tensor, count: int, rounds: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TGVC (steps 4-5) on the ``others`` (B, R) patches, raster order. Returns the targets (B, count) patch
    indices, their merged features (B, count, D), the rest (B, R - count) patch indices and which targets
    each rest patch was assigned to in any round (B, R - count, count) bool."""
    x_o, text_o = gather_rows(features.float(), others), gather_rows(text_sim.float(), others)
    v_o, u_o = text_o[:, :, 0], token_columns(text_o[:, :, 1])
    relevance = unit_scores(v_o, u_o).sum(-1)  # the mean over the tokens, up to a positive factor per image
    chosen = top_k_mask(relevance, count)
    target_pos = mask_indices(chosen, count)
    rest_pos = mask_indices(~chosen, others.shape[1] - count)
    x_t, v_t, u_t = (gather_rows(t, target_pos) for t in (x_o, v_o, u_o))
    x_r, v_r, u_r = (gather_rows(t, rest_pos) for t in (x_o, v_o, u_o))
    rest_dir = unit_scores(v_r, u_r)  # (B, H, W) the rest patches never change
    assigned = torch.zeros((*rest_pos.shape, count), dtype=torch.bool, device=features.device)
    for _ in range(rounds):
        metric = rest_dir @ unit_scores(v_t, u_t).transpose(1, 2)  # (B, H, count)
        onehot = torch.nn.functional.one_hot(metric.argmax(-1), count).to(x_r.dtype)  # (B, H, count)
        assigned |= onehot.bool()
        share = onehot / onehot.sum(1, keepdim=True).clamp(min=1)  # each target's mean over its patches
        mean = lambda rows: share.transpose(1, 2) @ rows  # noqa: E731
        x_t, v_t, u_t = x_t + mean(x_r), v_t + mean(v_r), u_t + mean(u_r)
    return others.gather(1, target_pos), x_t, others.gather(1, rest_pos), assigned


def check_options(complement_ratio, rounds, alpha) -> tuple[float, int, float]:
    def number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float))

    if not number(complement_ratio) or not 0 <= complement_ratio <= 1:  # False for NaN too
        raise VTCError(f"visiontrim: complement_ratio must be a number in [0, 1], got {complement_ratio!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise VTCError(f"visiontrim: rounds must be a whole number of at least 1, got {rounds!r}")
    if not number(alpha) or not 0 <= alpha <= 1:
        raise VTCError(f"visiontrim: alpha must be a number in [0, 1], got {alpha!r}")
    return float(complement_ratio), rounds, float(alpha)


@register("visiontrim")
class VisionTrim(Method):
    """VisionTrim: dominant tokens by CLS and received attention, text-guided complement tokens merged from the rest (Yu et al. 2026)."""

    attention = AttentionSpec(layer=-2, heads="mean", received="others")
    paper = "arXiv:2601.22674 (ICLR 2026)"
    code = "https://github.com/hanxunyu/VisionTrim"
    text = TEXT

    def __init__(
        self, complement_ratio: float = DEFAULT_COMPLEMENT_RATIO, rounds: int = DEFAULT_ROUNDS, alpha: float = DEFAULT_ALPHA
    ):
        self.complement_ratio, self.rounds, self.alpha = check_options(complement_ratio, rounds, alpha)
        needs = {Signal.FEATURES, Signal.CLS_ATTN, Signal.RECEIVED_ATTN}
        self.needs = frozenset(needs | ({Signal.TEXT_SIM} if self.complement_ratio > 0 else set()))
        self.text = TEXT if self.complement_ratio > 0 else TextSpec()  # DVTS alone composes with '+text'

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        features = signals.features
        batch, n = features.shape[:2]
        total = budget.tokens(n)
        dominant, count = split_budget(total, self.complement_ratio)
        score = dominance(signals.cls_attn, signals.received_attn, self.alpha)
        chosen = top_k_mask(score, dominant)
        kept = mask_indices(chosen, dominant)
        info = {"dominant": dominant, "complement": count}
        if count == 0:
            return Selection.from_kept(features, kept, info=[dict(info) for _ in range(batch)])
        check_text_sim(signals.text_sim)
        others = mask_indices(~chosen, n - dominant)
        targets, merged, rest, assigned = complement(features, signals.text_sim, others, count, self.rounds)
        selections = []
        for b in range(batch):  # the complement tokens' source counts differ per image
            mask = torch.zeros((count, n), dtype=torch.bool, device=features.device)
            mask[torch.arange(count, device=mask.device), targets[b]] = True
            mask[:, rest[b]] = assigned[b].T
            token, patch = mask.nonzero(as_tuple=True)
            sources = (patch, torch.bincount(token, minlength=count))
            selections.append(Selection.build(
                features[b], kept[b], merged_tokens=merged[b], merged_sources=sources, merged_anchors=targets[b], info=dict(info)
            ))
        return selections
