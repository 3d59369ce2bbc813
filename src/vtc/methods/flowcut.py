"""FlowCut: prune the visual tokens progressively inside the vision tower, by their information flow.

Paper: Tong et al. "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
Models", NeurIPS 2025, arXiv 2505.19536.
Official code: https://github.com/TungChintao/FlowCut (Apache-2.0, LICENSE read in the snapshot at
commit a2ecd24): ``compute_score`` and ``adaptive_prune_ratio`` in flowcut/utils_flowcut.py,
``CLIPAttention_forward`` / ``CLIPEncoderLayer_forward`` / ``CLIPEncoder_forward`` in
flowcut/modeling_clip_flowcut.py, the budget rule in flowcut/main.py. Read to understand; no code
was taken from it.

Algorithm, as the official LLaVA-1.5 code runs it, for one image of N patches and a budget of K.
The tower's layers l = 0, 1, ... run on the CLS token plus the patches still kept (M of them); F is the
number of layers LLaVA's feature layer reads (its hidden_states index: 23 of CLIP-L's 24 layers for
``vision_feature_layer=-2``), and r_l = F - 2 - l is how many layers are left before the last pruning
layer (official ``rpl = select_layer - idx - 1``, ``select_layer = num_layers - 2``). After layer l,
while M > K:
  1. From layer l's own attention, per head h (scale 1/sqrt(head_dim)):
       a_j   = softmax_t(q_cls . k_t / sqrt(d))_j, averaged over heads: the CLS row over CLS + patches;
       s_j   = softmax_t(v_cls . v_t)_j (no scale), averaged over heads: the "semantic" row;
       |v_j| = L1 norm of patch j's value vector averaged over heads (head_dim wide);
     each restricted to the M patches (the CLS column dropped, no renormalisation yet).
  2. score_j = (a_j / sum a + s_j / sum s) * |v_j|                       (``compute_score``)
  3. cumulative = score at the first scored layer, else 0.5 * cumulative + 0.5 * score
     (the kept tokens' cumulative scores carry over; the pruned ones are forgotten).
  4. Only where r_l is even (and >= 0): how many to prune,
       p = round((M - K) / sqrt(r_l) * (1 - (H(a) / log M)^2)),  H(a) the entropy of a / sum a
     (``adaptive_prune_ratio``; a flat CLS row prunes little, a peaked one prunes much), and
       p = M where r_l = 0 (so the target is reached after layer F - 2).
     Keep the top max(M - p, K) patches by cumulative score (CLS always kept), back in raster
     order; the rest are DROPPED (nothing is merged).
  5. Layer F - 1 runs on CLS + K patches; its output (CLS dropped) is LLaVA's feature layer.
So the K output tokens are kept patches, in raster order, each the feature-layer state of one patch.

The budget: ``flowcut(model, target_num=K)`` sets the tower's target to K + 1 (CLS + K patches) for
LLaVA's 'patch' features; vtc's budget K is that K.

What the official code also does in the language model (flowcut/modeling_llama_flowcut.py,
llava_llama_flowcut.py; installed by main.py only when ``image_aspect_ratio == 'anyres'``, i.e.
LLaVA-NeXT): every crop (base + tiles) is pruned in the tower to K/2 patches, the tiles' kept tokens are
put back in their spatial places (without image_newline tokens), and after decoder layer 1 the image's
tokens are cut to K by a text-conditioned score (the last instruction token's query against the image
keys, and its value against the image values, both softmaxed and head-averaged, times the image values'
L1 norm; top K, raster order). LLaVA-1.5 (``'pad'``) runs the tower part only.

Where it runs: the adapter's in-tower hook (models/tower_loop.py, stage "layer") runs the tower's layers up
to the feature layer with SDPA and hands each layer's per-head q/k/v to ``FlowCutReducer``, which computes
only the CLS rows (1 x (1+M) per head; no M x M map) and returns the kept positions. The K output tokens
are the feature layer's states of K patches, each KEPT with itself as its one source, in raster order.
Budgets: a count K or a ratio of the N patches; no 'auto' (the per-layer counts adapt, the target is fixed).
Families: LLaVA-1.5. LLaVA-NeXT / OneVision / Qwen-VL refuse (the hook is not wired for tiles; OneVision's
SigLIP and Qwen's ViT have no CLS token, which every step reads). Not composable with text recovery
(``flowcut+text``): recovery picks stock feature-layer patches, which an in-tower method never computes.

The official Qwen2-VL variant (FlowCut_Qwen/) is a different rule, not built here: no CLS, so the score is
the head-averaged attention of the mean query times the value L1 norm (no semantic term), the entropy is
not renormalised (+1e-7), the ViT target is 8x the final count in pre-merger patches (pruned, then the
2x2 merger groups whatever 4 consecutive tokens remain), and decoder layer 1 cuts the image to the final
count with the text-conditioned score above (batch size 1, one image).

Deliberate differences from the official code:
  * A batch: the hook keeps one token count for the whole batch, so each pruning layer prunes the batch's
    largest adaptive count, which is what the official code does with a batch (``r.max(0)``). Its
    LLaVA-1.5 evaluation runs one image per batch; vtc's pipeline batches the images it is given, so the
    intermediate counts (never the final K) can depend on the batch-mates. A batch of one is the official run.
  * The layer's attention runs through SDPA and FlowCut's rows are recomputed from the captured q/k/v, in
    fp32 (the official forward is eager, in the model's dtype); the fixtures agree to 1e-4.
  * 0 * log 0 is taken as 0 in the entropy (the official code gets NaN from a CLS attention that
    underflows to exactly 0, and then fails on ``int(nan)``).
  * Equal cumulative scores: the lower position is kept (``torch.topk`` leaves tie order unspecified).
  * The schedule reads the adapter's feature layer F; the official code fixes ``select_layer = num_layers
    - 2``, which is the same for LLaVA's -2. A feature layer with fewer than 2 layers before it is refused.
  * Only the tower stage: the LLaVA-NeXT language-model stage (decoder layer 1, above) is not built.
  * With K = N nothing is pruned; the official kept-index list then still counts the CLS (0..N), vtc's
    provenance is the N patches.
"""

from __future__ import annotations

import torch

from .base import Budget, InTowerMethod, VTCError, register
from .primitives import mask_indices, top_k_mask

# ----------------------------------------------------------------------------- one layer's signals


def layer_flow_signals(
    q_cls: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1 from one layer's per-head projections, CLS first: ``q_cls`` (B, H, d) the CLS query,
    ``keys`` / ``values`` (B, H, 1+M, d). Returns, over the M patches, the (B, M) CLS attention row, the
    (B, M) semantic row and the (B, M, d) head-averaged values. Only the CLS rows are computed (1 x (1+M)
    per head, never M x M)."""
    scale = q_cls.shape[-1] ** -0.5
    cls_attn = torch.einsum("bhd,bhtd->bht", q_cls * scale, keys).softmax(-1).mean(1)
    semantic = torch.einsum("bhd,bhtd->bht", values[:, :, 0], values).softmax(-1).mean(1)
    return cls_attn[:, 1:], semantic[:, 1:], values[:, :, 1:].mean(1)


def flow_score(cls_attn: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Step 2: (B, M) = (a / sum a + s / sum s) * |v|_1."""
    relation = cls_attn / cls_attn.sum(-1, keepdim=True)
    meaning = semantic / semantic.sum(-1, keepdim=True)
    return (relation + meaning) * values.abs().sum(-1)


def accumulate(cumulative: torch.Tensor | None, score: torch.Tensor) -> torch.Tensor:
    """Step 3: the running score, an even mix of the layers so far and this one."""
    return score if cumulative is None else 0.5 * cumulative + 0.5 * score


def prune_count(cls_attn: torch.Tensor, remaining: int, target: int) -> torch.Tensor:
    """Step 4's adaptive count, per image: (B,) round((M - K) / sqrt(r) * (1 - (H / log M)^2)) for the
    (B, M) CLS row ``cls_attn``, ``remaining`` = r > 0 layers left and ``target`` = K patches."""
    m = cls_attn.shape[-1]
    prob = cls_attn / cls_attn.sum(-1, keepdim=True)
    entropy = -torch.special.xlogy(prob, prob).sum(-1)
    ratio = entropy / torch.log(torch.tensor(float(m), dtype=entropy.dtype))
    return ((m - target) / remaining**0.5 * (1 - ratio**2)).round().long()


def layers_left(feature_layers: int, layer: int) -> int:
    """r_l: layers left after ``layer`` before the last pruning layer (F - 2, F = ``feature_layers``)."""
    return feature_layers - 2 - layer


def flowcut_step(
    cumulative: torch.Tensor | None,
    cls_attn: torch.Tensor,
    semantic: torch.Tensor,
    values: torch.Tensor,
    remaining: int,
    target: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps 2-4 after one layer whose M patches (M > ``target``) gave the step-1 signals, for a batch.
    Returns (the cumulative score over the patches kept, (B, M') positions kept in raster order or None
    where this layer prunes nothing). The count is the batch's largest (one image: its own)."""
    cumulative = accumulate(cumulative, flow_score(cls_attn, semantic, values))
    if remaining < 0 or remaining % 2:
        return cumulative, None
    m = cls_attn.shape[-1]
    pruned = int(prune_count(cls_attn, remaining, target).max()) if remaining else m
    keep = max(m - pruned, target)
    kept = mask_indices(top_k_mask(cumulative, keep), keep)  # top ``keep``, ties to the lower position
    return cumulative.gather(1, kept), kept


# ----------------------------------------------------------------------------- the method


class FlowCutReducer:
    """The in-tower hook's reducer (models/tower_loop.py): steps 1-4 after each whole layer.

    One reducer per tower run: it carries the cumulative score of the patches still kept, and in ``info``
    (copied into every Selection by the adapter) the patch count after each layer run."""

    stage = "layer"  # after the MLP's residual add: the layer's output is what is pruned
    size_bias = False  # pruning only: every token stays one patch

    def __init__(self, target: int, depth: int):
        self.target, self.depth = target, depth
        self.cumulative: torch.Tensor | None = None
        self.info: dict[str, list[int]] = {"patches_per_layer": []}

    def __call__(self, view):
        t = view.hidden.shape[1]
        step = self._step(view) if t - 1 > self.target else None
        self.info["patches_per_layer"].append(t - 1 if step is None else step.keep.shape[1] - 1)
        return step

    def _step(self, view):
        from ..models.tower_loop import Reduction

        bsz = view.hidden.shape[0]
        q_cls, keys, values = (x.float() for x in (view.queries[:, :, 0], view.keys, view.values))
        signals = layer_flow_signals(q_cls, keys, values)
        self.cumulative, kept = flowcut_step(self.cumulative, *signals, layers_left(self.depth, view.index), self.target)
        if kept is None:
            return None
        cls = torch.zeros((bsz, 1), dtype=torch.long, device=kept.device)
        return Reduction(torch.cat([cls, kept + 1], dim=1))


@register("flowcut")
class FlowCut(InTowerMethod):
    """FlowCut: patches pruned progressively inside the vision tower by cumulative information flow (Tong et al. 2025)."""

    tower_verb = "prunes"
    paper = "arXiv:2505.19536 (NeurIPS 2025)"
    code = "https://github.com/TungChintao/FlowCut (Apache-2.0)"
    tower_note = "every layer to the feature layer, CLS q/k and values (all heads)"

    def reducer(self, budget: Budget, num_patches: int, depth: int, prefix: int) -> FlowCutReducer:
        """The reducer that takes ``num_patches`` to the budget's count K by the output of layer ``depth`` - 2."""
        if prefix != 1:
            raise VTCError(
                f"flowcut reads the CLS token's attention row and value in every layer; this tower has {prefix} "
                "tokens before the patches, not one CLS (SigLIP has none)"
            )
        if depth < 2:
            raise VTCError(
                f"flowcut reaches its target after the layer before the feature layer; the feature layer here is "
                f"the output of {depth} layer(s), so no layer is left to prune in"
            )
        budget = Budget.parse(budget)
        self.check_budget(budget, num_patches)
        return FlowCutReducer(budget.tokens(num_patches), depth)
