"""The in-tower reduction hook: run a ViT tower's encoder layers one by one and let a method shrink the tokens inside.

Vision-side methods normally select from the feature layer's states after a stock tower forward. An
*in-tower* method (ToMe inside the tower, FlowCut) reduces the token set between layers, so every later
layer runs on fewer tokens. The adapter runs the loop (``run_tower``) and calls the method's *reducer*
in every layer up to the feature layer; what comes out at the feature layer is the token set the rest of
vtc uses (``TowerState.selections``: one Selection per image, provenance for every output token).

Interface
---------
``run_tower(layers, hidden, reducer, prefix, num_heads) -> TowerState``
    ``layers``: the encoder layers to run (LLaVA: ``tower.encoder.layers[:feature_index]``, i.e. up to
    the feature layer -2); ``hidden`` (B, prefix+N, D): the first layer's input; ``prefix``: tokens before
    the patches that are never reduced (CLIP's CLS: 1). Each layer is run from its own modules
    (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``: CLIP's and SigLIP's encoder layer), its
    attention through the model's configured implementation (SDPA by default); q/k/v are read from
    forward hooks on ``q_proj``/``k_proj``/``v_proj``, never recomputed.

A reducer (``method.reducer(budget, num_patches, depth, prefix)`` of a method with ``in_tower = True``) has
    ``stage``      ``"attention"``: called in each layer after the attention's residual add, before the MLP
                   (ToMe's place); ``"layer"``: after the whole layer (FlowCut's).
    ``size_bias``  True: proportional attention, log(size) of each key added to the attention logits as an
                   additive float mask (B, 1, 1, T), so SDPA is kept; no mask while every size is 1.
    ``__call__(view: LayerView) -> Reduction | None``   None keeps every token.
    ``info``       (optional) a dict the adapter copies into every output Selection's ``info``.
A reducer is made per batch and may keep state across layers (FlowCut's cumulative score).

``LayerView`` (what the reducer sees; T = prefix + current patch tokens, H heads of width hd):
    ``index``    0-based encoder layer just run; ``depth``: how many layers run (the last is depth - 1)
    ``hidden``   (B, T, D) the residual stream at the reducer's stage
    ``queries``, ``keys``, ``values``   (B, H, T, hd) this layer's projections (pre-SDPA, per head)
    ``bias``     (B, 1, 1, T) the additive mask this layer's attention used, or None
    ``size``     (B, T) float32: how many original patches each token holds (prefix tokens: 1)
    ``place``    (B, N) long: the current token (0..T-1, prefix counted) holding each original patch, -1 if dropped
    ``prefix``, ``scale`` (hd ** -0.5)
    ``cls_attention()`` -> (B, H, T): the first token's (CLS) attention row of this layer, per head, bias included

``Reduction`` (what the reducer returns; every image keeps the same count T'):
    ``keep``        (B, T') long: the current tokens that stay, in their new order; the prefix first (0..prefix-1)
    ``merge_from``  (B, M) long or None: tokens folded into a kept one (not themselves kept)
    ``merge_into``  (B, M) long or None: the kept token each is folded into
    Merges are size-weighted averages, x <- (s x + sum s_i x_i) / (s + sum s_i), s <- s + sum s_i; a token
    neither kept nor folded is dropped (its patches get place -1: pruning). Removing a token is the same as
    masking it out of attention from then on (tests/test_tower_loop.py checks both).

``TowerState``: ``hidden`` (B, prefix+K, D) at the feature layer, ``size`` (B, prefix+K), ``place`` (B, N);
``selections()``: output tokens, each a KEPT patch (size 1, its one patch) or a MERGED token (its patches),
kept ones first in raster order, merged ones ordered by their first patch (the after-tower ToMe's order).

Plugging a method in: set ``in_tower = True`` and ``needs = frozenset()`` on the Method, give it
``reducer(budget, num_patches, depth, prefix)`` (budget already parsed; refuse an unreachable budget
there with a VTCError), and make ``select_batch`` refuse (there are no finished features to select from).
A family serves in-tower methods when its adapter sets ``tower_hook = True`` and routes them to the loop
(``LlavaAdapter.compress_in_tower``: embeddings + pre-layernorm, the layers up to the feature layer, the
output count checked against the budget); other families refuse them (``Family.tower_support``).
A pruning method such as FlowCut: ``stage = "layer"``, ``size_bias = False``, per layer
``view.cls_attention()[..., prefix:]`` (mean over heads as it likes), ``view.values`` for value norms,
``view.depth - view.index - 1`` layers left, its cumulative score kept on the reducer and gathered with
its own ``keep``, and ``Reduction(keep=cat([0], 1 + kept positions in order))``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ..methods.base import Selection, VTCError
from ..methods.merging import merge_rows
from ..methods.primitives import gather_rows


@dataclass
class LayerView:
    """One layer as the reducer sees it (see the module docstring)."""

    index: int
    depth: int
    hidden: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    size: torch.Tensor
    place: torch.Tensor
    prefix: int

    @property
    def scale(self) -> float:
        return self.queries.shape[-1] ** -0.5

    def cls_attention(self) -> torch.Tensor:
        """(B, H, T) softmax of the first token's query over every key, as this layer's attention computed it."""
        logits = torch.einsum("bhd,bhtd->bht", self.queries[:, :, 0].float(), self.keys.float()) * self.scale
        if self.bias is not None:
            logits = logits + self.bias[:, :, 0].float()
        return logits.softmax(-1)


@dataclass
class Reduction:
    """The token set after a reducer's step (see the module docstring)."""

    keep: torch.Tensor
    merge_from: torch.Tensor | None = None
    merge_into: torch.Tensor | None = None


class Reducer(Protocol):
    stage: Literal["attention", "layer"]
    size_bias: bool

    def __call__(self, view: LayerView) -> Reduction | None: ...


@dataclass
class TowerState:
    hidden: torch.Tensor
    size: torch.Tensor
    place: torch.Tensor
    prefix: int
    # per layer run, the tokens (prefix included) its attention and its MLP saw: what the tower's FLOPs follow
    layer_tokens: list[tuple[int, int]] = field(default_factory=list)

    def bias(self, on: bool) -> torch.Tensor | None:
        """log(size) as an additive attention mask (B, 1, 1, T), or None when off or every size is 1."""
        if not on or bool((self.size == 1).all()):
            return None
        return self.size.log()[:, None, None, :].to(self.hidden.dtype)

    def reduce(self, step: Reduction) -> "TowerState":
        """The state after ``step``: merges folded in (size-weighted), then the kept rows gathered in order."""
        goes = self._check(step)
        hidden, size = self.hidden, self.size
        if step.merge_from is not None and step.merge_from.numel():
            bsz, t, _ = hidden.shape
            size_from = size.gather(1, step.merge_from)
            flat_into = (step.merge_into + torch.arange(bsz, device=hidden.device)[:, None] * t).reshape(-1)
            new_size = size.reshape(-1).index_add(0, flat_into, size_from.reshape(-1)).reshape(bsz, t)
            weighted = gather_rows(hidden, step.merge_from).float() * size_from[..., None]
            merged = merge_rows(hidden, size, flat_into, weighted, new_size)
            touched = new_size != size  # untouched rows stay bit-exact (no x * s / s rounding)
            hidden = torch.where(touched[..., None], merged, hidden)
            size = new_size
            goes.scatter_(1, step.merge_from, goes.gather(1, step.merge_into))
        place = torch.where(self.place >= 0, goes.gather(1, self.place.clamp(min=0)), -1)
        return TowerState(gather_rows(hidden, step.keep), size.gather(1, step.keep), place, self.prefix)

    def _check(self, step: Reduction) -> torch.Tensor:
        """Refuse a malformed reduction; returns each current token's new position (-1: not kept)."""
        bsz, t = self.size.shape
        keep = step.keep
        if keep.dtype != torch.long or keep.ndim != 2 or keep.shape[0] != bsz or not self.prefix <= keep.shape[1] <= t:
            raise VTCError(f"reducer: keep must be (B={bsz}, T') long indices with {self.prefix} <= T' <= {t}")
        if bool((keep.min() < 0) | (keep.max() >= t)) or not torch.equal(
            keep[:, : self.prefix], torch.arange(self.prefix, device=keep.device).expand(bsz, self.prefix)
        ):
            raise VTCError(f"reducer: keep indices must be in [0, {t}) and start with the {self.prefix} prefix tokens")
        goes = torch.full((bsz, t), -1, dtype=torch.long, device=keep.device)
        goes.scatter_(1, keep, torch.arange(keep.shape[1], device=keep.device).expand_as(keep))
        if bool(((goes >= 0).sum(1) != keep.shape[1]).any()):
            raise VTCError("reducer: keep lists a token twice")
        if (step.merge_from is None) != (step.merge_into is None):
            raise VTCError("reducer: merge_from and merge_into go together")
        if step.merge_from is not None and step.merge_from.numel():
            src, dst = step.merge_from, step.merge_into
            if src.shape != dst.shape or src.shape[0] != bsz or src.dtype != torch.long or dst.dtype != torch.long:
                raise VTCError("reducer: merge_from and merge_into must be (B, M) long indices of the same shape")
            if bool((src.min() < 0) | (src.max() >= t) | (dst.min() < 0) | (dst.max() >= t)):
                raise VTCError(f"reducer: merge indices must be in [0, {t})")
            if bool((goes.gather(1, src) >= 0).any() | (goes.gather(1, dst) < 0).any()):
                raise VTCError("reducer: a merge must fold a token that is not kept into one that is")
        return goes

    def selections(self) -> list[Selection]:
        """One Selection per image: the K output tokens at the feature layer and the patches of each."""
        tokens, place = self.hidden[:, self.prefix :], self.place - self.prefix  # -1 - prefix: dropped
        return selections_from_places(tokens, place.clamp(min=-1))


def selections_from_places(tokens: torch.Tensor, place: torch.Tensor) -> list[Selection]:
    """Selections from K tokens per image (B, K, D) and each patch's token ``place`` (B, N) (-1: dropped).

    A token holding one patch is that patch KEPT; a token holding several is MERGED. Kept patches come
    first in raster order, merged tokens after them ordered by their first patch."""
    bsz, k, d = tokens.shape
    n = place.shape[1]
    held = torch.zeros(bsz, k + 1, dtype=torch.long, device=place.device)  # column k: the dropped patches
    slot = torch.where(place >= 0, place, k)
    held.scatter_add_(1, slot, torch.ones_like(slot))
    held = held[:, :k]  # at least 1 each: a token starts with its patch, merges add, drops remove the token
    raster = torch.arange(n, device=place.device).expand(bsz, n)
    first = torch.full((bsz, k + 1), n, dtype=torch.long, device=place.device).scatter_reduce_(
        1, slot, raster, reduce="amin"
    )[:, :k]
    merged = held > 1
    merged_order = torch.where(merged, first, n + first).sort(dim=-1).indices  # merged ones first, by first patch
    rank = torch.empty_like(first).scatter_(1, merged_order, torch.arange(k, device=place.device).expand(bsz, k))
    patch_merged = torch.where(place >= 0, merged.gather(1, place.clamp(min=0)), False)
    # sort key: dropped patches last, kept patches (raster) first, then each merged token's patches together
    key = torch.where(patch_merged, rank.gather(1, place.clamp(min=0)) * n + raster, raster - n)
    key = torch.where(place >= 0, key, k * n + raster)
    by_output = key.sort(dim=-1).indices
    patch_rows = gather_rows(tokens, place.clamp(min=0))  # each patch's token, for the kept ones
    sizes = held.gather(1, merged_order)
    num_merged, num_kept = merged.sum(1).tolist(), (held == 1).sum(1).tolist()
    out = []
    for i in range(bsz):
        kept = by_output[i, : num_kept[i]]
        merged_patches = by_output[i, num_kept[i] : num_kept[i] + int(sizes[i, : num_merged[i]].sum())]
        chosen = merged_order[i, : num_merged[i]]
        out.append(Selection.build(
            patch_rows[i], kept, merged_tokens=tokens[i, chosen] if num_merged[i] else None,
            merged_sources=(merged_patches, sizes[i, : num_merged[i]]),
        ))
    return out


@contextmanager
def _capture_qkv(layers):
    """q/k/v projections of every layer's attention as they are computed: {"q": ..., "k": ..., "v": ...}."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        attn = layer.self_attn
        for name, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
            handles.append(proj.register_forward_hook(lambda module, args, out, name=name: captured.__setitem__(name, out)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, num_heads, d // num_heads).transpose(1, 2)


def run_tower(layers, hidden: torch.Tensor, reducer: Reducer | None, prefix: int, num_heads: int) -> TowerState:
    """Run ``layers`` on ``hidden`` (B, prefix+N, D), calling ``reducer`` in each (see the module docstring)."""
    bsz, t, _ = hidden.shape
    n = t - prefix
    place = (prefix + torch.arange(n, device=hidden.device)).expand(bsz, n)
    state = TowerState(hidden, torch.ones(bsz, t, dtype=torch.float32, device=hidden.device), place, prefix)
    size_bias = reducer is not None and reducer.size_bias
    stage = None if reducer is None else reducer.stage
    if stage not in (None, "attention", "layer"):
        raise VTCError(f"reducer stage must be 'attention' or 'layer', got {stage!r}")
    layer_tokens = []
    with _capture_qkv(layers) as qkv:
        for index, layer in enumerate(layers):
            bias = state.bias(size_bias)
            x = state.hidden
            attention_tokens = x.shape[1]
            attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=bias)
            x = x + attended
            if stage == "attention":
                state = _step(reducer, state, x, qkv, bias, index, len(layers), num_heads)
                x = state.hidden
            layer_tokens.append((attention_tokens, x.shape[1]))
            x = x + layer.mlp(layer.layer_norm2(x))
            state.hidden = x
            if stage == "layer":
                state = _step(reducer, state, x, qkv, bias, index, len(layers), num_heads)
    state.layer_tokens = layer_tokens
    return state


def _step(reducer, state: TowerState, x, qkv, bias, index: int, depth: int, num_heads: int) -> TowerState:
    state = TowerState(x, state.size, state.place, state.prefix)
    view = LayerView(index, depth, x, _heads(qkv["q"], num_heads), _heads(qkv["k"], num_heads),
                     _heads(qkv["v"], num_heads), bias, state.size, state.place, state.prefix)
    step = reducer(view)
    return state if step is None else state.reduce(step)
