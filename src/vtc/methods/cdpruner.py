"""CDPruner: keep the visual tokens that maximise a determinantal point process conditioned on the question.

Paper: Zhang et al. "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967.
Official code: https://github.com/Theia-4869/CDPruner (Apache-2.0, LICENSE read in the snapshot at
commit 9541616): ``LlavaMetaForCausalLM.encode_images`` in llava/model/llava_arch.py and
``CLIPVisionTower.forward`` in llava/model/multimodal_encoder/clip_encoder.py. Read to understand;
no code was taken from it.

Algorithm, as the official LLaVA-1.5 code runs it, for one image of N patches and a budget of T:
  1. x_i = the projector's output for patch i (LLaVA's feature layer -2, CLS dropped);
     S_ij = cos(x_i, x_j), in fp32.
  2. e_i = CLIP's visual_projection(post_layernorm(patch i's state at the same feature layer -2)),
     NOT the final layer CLIP's own image embedding reads; t_1..t_M = CLIP text embeddings of the
     question (the evaluation's question with LLaVA's "Answer the question using a single word or
     phrase." line removed), tokenised whole and cut into 77-token segments, the last one padded
     with id 0 under a zero attention mask (M = 1 for any question within CLIP's context).
  3. r_i = mean_m -cos(e_i, t_m): the NEGATED cosine. The authors found that LLaVA's CLIP
     feature-layer patches point away from the question they show, so the sign is flipped
     (official issues #9, #14, #22; the paper's text describes the plain relevance).
  4. r = (r - min r + 1e-6) / (max r - min r), min and max over the batch (one image in the
     official evaluation).
  5. (Off in the official code, a commented-out option: r = exp(alpha r), alpha = theta / (2 (1 - theta)).)
  6. Kernel L = diag(r) S diag(r).
  7. Greedy MAP inference (Chen et al. 2018's Cholesky update): gain_i = L_ii; T times: pick
     j = argmax gain (the first index on ties); c_j = (L_j - sum_t c_t[j] c_t) / sqrt(gain_j);
     gain -= c_j^2; the pick's gain becomes -inf.
  8. The T picks, sorted into raster order, are kept as they are; nothing is merged.

vtc's signals: step 1 is Signal.PROJECTED (the adapter's projector on the feature-layer patches).
Steps 2-3 are TEXT_SIM read as ``TEXT`` says (CLIP's text tower on the feature-layer patch states,
post-layernorm, unscaled cosine, whole question in segments): the CLIP scorer then computes
mean_m cos(e_i, t_m), the official quantity before the sign, for the question the pipeline
passes. With the LLM-embedding text source (``text_source="llm"``) TEXT_SIM is instead the
question's tokens in the language model's embedding table against the projected tokens (its
pooling, not a cosine with a CLIP text embedding): the sign flip of step 3 is a finding about
CLIP, so with that source ``relevance="direct"`` is the meaningful choice.

Defaults: the official code's (negated relevance, no theta, projected tokens), the budget's T.
Budgets: a count or a ratio of N; no 'auto' (the paper has no dynamic rule).
A batch is selected at once: one batched matmul for the B kernels, then T batched greedy steps.

Deliberate differences from the official code:
  * The relevance is min-max normalised per image (per set of tokens the method is given); the
    official code normalises over the whole batch it is given: one image on LLaVA-1.5, all crops of
    an image on LLaVA-NeXT (vtc's global scope normalises over the image's unpadded candidates).
  * When every relevance is equal the official code divides by zero (an inf/NaN kernel); vtc
    takes them all as 1 (the DPP then reads similarity alone).
  * When the best remaining gain is not positive (the kernel is exhausted: budget above its
    numerical rank, e.g. more tokens than the projected width, or duplicate tokens), the official
    code takes the square root of it, gets NaN and may pick a token twice, keeping fewer than T.
    vtc adds nothing to the basis for that pick and goes on with the largest remaining gains:
    always T distinct tokens, identical picks while the gains stay positive.
  * Token vectors are normalised in fp32 (the official code normalises in the model's dtype,
    then casts); a zero vector has cosine 0 with everything (NaN in the official code).
  * LLaVA-NeXT: the official code runs the DPP on each crop with the same count per crop (base
    included) before unpadding, so the count after unpadding varies; vtc ranks all the image's
    unpadded candidates together (exact count), or per tile with the adapter's split (per_tile).
  * The official code projects all N patches and masks afterwards; vtc gathers the T kept
    patches and projects only those (identical: the projector is token-wise).

Options: ``relevance="negated"`` (official) or ``"direct"`` (the paper's description);
``theta`` (None: off, as in the official code; else in [0, 1)); ``space="projected"``
(official) or ``"features"`` (similarity on the vision features instead).
"""

from __future__ import annotations

from typing import Literal

import torch

from .base import Budget, Method, Selection, Signal, Signals, TextSpec, VTCError, register

# CDPruner's reading of CLIP: the feature layer's patch states, the whole question in segments.
TEXT = TextSpec(patch_states="feature", segments=True)
EPSILON = 1e-6  # the official offset: the least relevant token keeps a small nonzero weight


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 signals are scored in fp32 (the official kernel is fp32); fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def relevance_weights(text_sim: torch.Tensor, relevance: str = "negated", theta: float | None = None) -> torch.Tensor:
    """(B, N) per-token kernel weights r from the text score (steps 3-5), min-max normalised per image."""
    score = _at_least_fp32(text_sim)
    score = -score if relevance == "negated" else score
    low, high = score.amin(-1, keepdim=True), score.amax(-1, keepdim=True)
    spread = high - low
    weights = (score - low + EPSILON) / spread
    weights = torch.where(spread > 0, weights, torch.ones_like(weights))  # all equal: no conditioning
    if theta is not None:
        weights = torch.exp(theta / (2 * (1 - theta)) * weights)
    return weights


def conditional_kernel(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N, N) L = diag(r) S diag(r), S the cosine similarity of (B, N, D) ``vectors`` (step 6)."""
    unit = torch.nn.functional.normalize(_at_least_fp32(vectors), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    return weights.unsqueeze(2) * similarity * weights.unsqueeze(1)


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) the greedy MAP picks of the DPP with (B, N, N) ``kernel``, in pick order (step 7).

    Each step picks, for every image at once, the token whose addition multiplies det(L_S) most:
    its gain is its squared distance, in the kernel's geometry, from the span of the picks so far,
    kept up to date with one Cholesky row per pick. Ties go to the lower index."""
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    gain = kernel.diagonal(dim1=1, dim2=2).clone()
    basis = kernel.new_zeros((b, k, n))  # row t: the picks' Cholesky row t, over every token
    taken = torch.zeros((b, n), dtype=torch.bool, device=kernel.device)
    picks = torch.empty((b, k), dtype=torch.long, device=kernel.device)
    for t in range(k):
        pick = gain.masked_fill(taken, -torch.inf).argmax(-1)
        best = gain[rows, pick]
        overlap = (basis[rows, :t, pick].unsqueeze(1) @ basis[:, :t]).squeeze(1)  # sum_s c_s[pick] c_s
        residual = (kernel[rows, pick] - overlap) / best.clamp(min=torch.finfo(best.dtype).tiny).sqrt().unsqueeze(1)
        step = torch.where((best > 0).unsqueeze(1), residual, torch.zeros_like(residual))  # exhausted: adds nothing
        basis[:, t] = step
        gain -= step.square()
        taken[rows, pick] = True
        picks[:, t] = pick
    return picks


@register("cdpruner")
class CDPruner(Method):
    """CDPruner: greedy MAP of a DPP over the tokens, conditioned on the question's relevance (Zhang et al. 2025)."""

    paper = "arXiv:2506.10967 (NeurIPS 2025)"
    code = "https://github.com/Theia-4869/CDPruner"
    pairwise = True
    text = TEXT

    def __init__(
        self,
        relevance: Literal["negated", "direct"] = "negated",
        theta: float | None = None,
        space: Literal["projected", "features"] = "projected",
    ):
        if relevance not in ("negated", "direct"):
            raise VTCError(f"cdpruner: relevance must be 'negated' (official code) or 'direct', got {relevance!r}")
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 <= theta < 1):
            raise VTCError(f"cdpruner: theta must be None or a number in [0, 1), got {theta!r}")
        if space not in ("projected", "features"):
            raise VTCError(f"cdpruner: space must be 'projected' or 'features', got {space!r}")
        self.relevance, self.theta, self.space = relevance, None if theta is None else float(theta), space
        self.needs = frozenset({Signal.FEATURES, Signal.TEXT_SIM, Signal.PROJECTED if space == "projected" else Signal.FEATURES})

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        n = signals.num_patches
        k = budget.tokens(n)
        if k >= n:
            kept = torch.arange(n, device=signals.features.device).expand(signals.batch_size, n)
        else:
            vectors = signals.projected if self.space == "projected" else signals.features
            weights = relevance_weights(signals.text_sim, self.relevance, self.theta)
            kept = greedy_map(conditional_kernel(vectors, weights), k).sort(dim=-1).values
        return Selection.from_kept(signals.features, kept)
