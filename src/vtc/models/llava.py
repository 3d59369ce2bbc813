"""LLaVA-1.5 glue: compute a method's signals in one vision-tower forward, splice K tokens back in.

Works on a stock ``transformers`` ``LlavaForConditionalGeneration`` with a CLIP
vision tower. The vision tower runs with its configured attention (SDPA by
default); the CLS attention row and the keys of the one layer a method reads
are computed from that layer's q/k projections captured with forward hooks, so
no N x N attention matrix is ever built and eager attention is never needed.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..methods.base import AttentionSpec, Budget, Method, Selection, Signal, Signals, TextSpec, VTCError
from .clip_text import ClipTextScorer
from .family import Family, register_family, timed
from .embed_text import EmbeddingTextScorer
from .tower_loop import run_tower


def check_supported(
    model, model_class: str = "LlavaForConditionalGeneration", family: str = "LLaVA-1.5",
    tower_class: str = "CLIPVisionModel", strategy: str = "default",
) -> None:
    """Refuse, with a clear message, anything a LLaVA-style adapter cannot serve: another model class, another
    vision tower than ``tower_class``, multi-layer features, another ``vision_feature_select_strategy``."""
    import transformers

    if not isinstance(model, getattr(transformers, model_class)):
        raise VTCError(
            f"model of class {type(model).__name__} is not supported: vtc's {family} adapter needs a "
            f"transformers {model_class} ({family} family)"
        )
    tower = model.model.vision_tower
    if not isinstance(tower, getattr(transformers, tower_class)):
        kind = tower_class.removesuffix("VisionModel")
        raise VTCError(f"LLaVA vision tower {type(tower).__name__} is not supported; vtc needs a {kind} vision tower")
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise VTCError(f"vision_feature_layer={cfg.vision_feature_layer}: multi-layer features are not supported")
    if cfg.vision_feature_select_strategy != strategy:
        kept = "(CLS dropped)" if strategy == "default" else "(every token)"
        raise VTCError(
            f"vision_feature_select_strategy='{cfg.vision_feature_select_strategy}' is not supported: "
            f"vtc compresses the patch tokens of the '{strategy}' strategy {kept}"
        )


@dataclass
class _Capture:
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    all_queries: bool = False  # keep every query row (received attention), not just the CLS row


def cls_attention_row(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, heads: str) -> torch.Tensor:
    """The CLS query's attention over all 1+N tokens, CLS column dropped -> (B, N).

    q_cls (B, D), keys (B, 1+N, D) are raw q_proj / k_proj outputs. ``single`` treats
    the full width as one head (scale 1/sqrt(D)); ``mean``/``sum`` reduce the model's heads.
    """
    b, t, d = keys.shape
    if heads == "single":
        logits = torch.einsum("bd,btd->bt", q_cls, keys) / d**0.5
        return logits.softmax(-1)[:, 1:]
    hd = d // num_heads
    logits = torch.einsum("bhd,bthd->bht", q_cls.view(b, num_heads, hd), keys.view(b, t, num_heads, hd)) / hd**0.5
    probs = logits.softmax(-1)[:, :, 1:]
    return probs.mean(1) if heads == "mean" else probs.sum(1)


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, heads: str, chunk: int = 64, prefix: int = 1,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Attention each patch receives, averaged over the N patch queries -> (B, N); with ``exclude_self``
    over the N - 1 other patches' queries (a patch's attention to itself left out).

    queries / keys (B, prefix+N, D) are raw q_proj / k_proj outputs, ``prefix`` non-patch
    tokens first (CLIP's CLS: 1; SigLIP: 0); the softmax runs over all keys (as in the
    model), then the prefix rows and columns are dropped. Query rows are processed
    ``chunk`` at a time, so at most (B, heads, chunk, prefix+N) is held, never the N x N
    map. ``heads`` as in ``cls_attention_row``.
    """
    b, t, d = keys.shape
    h = 1 if heads == "single" else num_heads
    hd = d // h
    k = keys.view(b, t, h, hd).transpose(1, 2)  # B, h, T, hd
    total = torch.zeros(b, h, t - prefix, dtype=torch.float32, device=keys.device)
    for start in range(prefix, t, chunk):
        q = queries[:, start : start + chunk].reshape(b, -1, h, hd).transpose(1, 2)  # B, h, c, hd
        probs = (q @ k.transpose(-1, -2) / hd**0.5).float().softmax(-1)
        total += probs[..., prefix:].sum(2)
        if exclude_self:  # query row start + i is key column start + i
            rows = probs.shape[2]
            total[..., start - prefix : start - prefix + rows] -= probs[..., start : start + rows].diagonal(dim1=2, dim2=3)
    per_head = total / max(1, t - prefix - exclude_self)
    return per_head.sum(1) if heads == "sum" else per_head.mean(1)


@register_family
class LlavaAdapter(Family):
    """Signals from, and token splicing into, a stock HF LLaVA-1.5 model: one image is one patch grid."""

    name = "llava-1.5"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    # Non-patch tokens the tower puts before the patches (CLIP's CLS); signals read the patches after them.
    prefix: ClassVar[int] = 1
    tower_hook = True  # in-tower methods run (compress_in_tower)

    def __init__(self, model, text_scorer: ClipTextScorer | EmbeddingTextScorer | None = None):
        self.check_supported(model)
        self.model = model
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.text_scorer = text_scorer
        self.image_token_id = model.config.image_token_id
        vcfg = self.tower.config
        self.num_layers = vcfg.num_hidden_layers
        self.num_heads = vcfg.num_attention_heads
        side = vcfg.image_size // vcfg.patch_size
        self.grid = (side, side)
        self.num_patches = side * side
        # hidden_states[i] is the input of encoder layer i; LLaVA reads hidden_states[vision_feature_layer].
        self.feature_index = model.config.vision_feature_layer % (self.num_layers + 1)

    # ------------------------------------------------------------------ signals

    def shallow_index(self, spec: AttentionSpec) -> int:
        """The encoder layer of CLS_ATTN_SHALLOW: ceil(spec.shallow * depth) - 1 (see AttentionSpec)."""
        if not 0 < spec.shallow <= 1:
            raise VTCError(f"attention.shallow={spec.shallow}: a share of the tower's depth, in (0, 1]")
        return math.ceil(spec.shallow * self.num_layers) - 1

    def layer_index(self, spec: AttentionSpec) -> int:
        index = spec.layer % self.num_layers if spec.layer < 0 else spec.layer
        if not 0 <= index < self.num_layers:
            raise VTCError(f"attention layer {spec.layer} does not exist in a {self.num_layers}-layer vision tower")
        return index

    @contextmanager
    def _capture_qk(self, layer: int, capture: _Capture):
        attn = self.tower.encoder.layers[layer].self_attn

        def keep_q(module, args, output):
            capture.q = output if capture.all_queries else output[:, 0]

        def keep_k(module, args, output):
            capture.k = output

        handles = [attn.q_proj.register_forward_hook(keep_q), attn.k_proj.register_forward_hook(keep_k)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def downsample(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The image at a lower resolution giving ``grid`` patches (antialiased bilinear; commutes with normalisation)."""
        if any(g < 1 for g in grid) or grid[0] > self.grid[0] or grid[1] > self.grid[1]:
            raise VTCError(f"input grid {grid} must be between 1x1 and the tower's {self.grid[0]}x{self.grid[1]}")
        p = self.tower.config.patch_size
        size = (grid[0] * p, grid[1] * p)
        return torch.nn.functional.interpolate(pixel_values.float(), size=size, mode="bilinear", antialias=True).to(pixel_values.dtype)

    def embed(self, pixel_values: torch.Tensor, resized: bool) -> torch.Tensor:
        """The input of the first encoder layer: CLIP's embeddings then its pre-layernorm."""
        return self.tower.pre_layrnorm(self.tower.embeddings(pixel_values, interpolate_pos_encoding=resized))

    @torch.no_grad()
    def signals(
        self,
        pixel_values: torch.Tensor,
        needs: frozenset[str],
        attention: AttentionSpec,
        text_queries: list[str] | None = None,
        grid: tuple[int, int] | None = None,
        text: TextSpec = TextSpec(),
    ) -> Signals:
        """Run the vision tower once, only as deep as needed, and compute the declared signals.

        ``grid``: run the tower on the image downsampled to that patch grid (position
        embeddings interpolated), for methods that shrink the input. ``text``: how TEXT_SIM is scored.
        """
        if not torch.isfinite(pixel_values).all():
            raise VTCError("pixel_values contain NaN or inf")
        resized = grid is not None and tuple(grid) != self.grid
        if resized:
            pixel_values = self.downsample(pixel_values, tuple(grid))
        needs_attn = bool(needs & {Signal.CLS_ATTN, Signal.KEYS, Signal.RECEIVED_ATTN})
        needs_text = Signal.TEXT_SIM in needs
        if needs_text and self.text_scorer is None:
            raise VTCError("this method needs a text score: pass a CLIP checkpoint (--clip PATH) or use --text-source llm")
        if needs_text and (text_queries is None or len(text_queries) != pixel_values.shape[0]):
            raise VTCError("text-guided methods need one question per image")
        attn_layer = self.layer_index(attention) if needs_attn else -1
        shallow_layer = self.shallow_index(attention) if Signal.CLS_ATTN_SHALLOW in needs else -1
        text_reads = getattr(self.text_scorer, "reads", "final") if needs_text else None
        if text_reads not in (None, "final", "projected"):
            raise VTCError(f"text scorer reads {text_reads!r}; the LLaVA adapter gives 'final' or 'projected' patch tokens")
        reads_final = text_reads == "final" and text.patch_states == "final"  # else CLIP scores the feature layer
        depth = max(self.feature_index, attn_layer + 1, shallow_layer + 1, self.num_layers if reads_final else 0)

        capture, shallow = _Capture(all_queries=Signal.RECEIVED_ATTN in needs), _Capture()
        dtype = self.tower.embeddings.patch_embedding.weight.dtype
        hidden = self.embed(pixel_values.to(dtype), resized)
        features = hidden if self.feature_index == 0 else None
        with ExitStack() as hooks:
            if needs_attn:
                hooks.enter_context(self._capture_qk(attn_layer, capture))
            if shallow_layer >= 0:
                hooks.enter_context(self._capture_qk(shallow_layer, shallow))
            for i, layer in enumerate(self.tower.encoder.layers[:depth]):
                hidden = layer(hidden, None)
                if i + 1 == self.feature_index:
                    features = hidden

        out = Signals(features=features[:, self.prefix :], grid=tuple(grid) if resized else self.grid)
        if resized:
            out.source_grid = self.grid
        if Signal.CLS_FEATURE in needs:
            out.cls_feature = features[:, 0]
        if Signal.CLS_ATTN in needs:
            q_cls = capture.q[:, 0] if capture.all_queries else capture.q
            out.cls_attn = cls_attention_row(q_cls, capture.k, self.num_heads, attention.heads)
        if shallow_layer >= 0:
            out.cls_attn_shallow = cls_attention_row(shallow.q, shallow.k, self.num_heads, attention.heads)
        if Signal.RECEIVED_ATTN in needs:
            out.received_attn = received_attention(capture.q, capture.k, self.num_heads, attention.heads, prefix=self.prefix,
                                                   exclude_self=attention.received == "others")
        if Signal.KEYS in needs:
            keys = capture.k[:, self.prefix :]
            if attention.keys == "head_mean":
                keys = keys.reshape(*keys.shape[:2], self.num_heads, -1).mean(2)
            out.keys = keys
        projected = self.projector(out.features) if Signal.PROJECTED in needs or text_reads == "projected" else None
        if needs_text:  # a CLIP scorer reads tower patch states (final or feature layer), an LLM-embedding one the projected tokens
            states = {"final": hidden[:, self.prefix :] if reads_final else out.features, "projected": projected}[text_reads]
            out.text_sim = self.text_scorer.similarity(states, text_queries, text)
        if Signal.PROJECTED in needs:
            out.projected = projected
        out.validate()
        return out

    # ------------------------------------------------------------------ splice

    @torch.no_grad()
    def project(self, selections: list[Selection]) -> list[torch.Tensor]:
        """The projector on each image's K output tokens (a token-wise MLP, so selecting first is exact)."""
        counts = [s.num_tokens for s in selections]
        projected = self.projector(torch.cat([s.tokens for s in selections]).unsqueeze(0)).squeeze(0)
        return list(projected.split(counts))

    # ------------------------------------------------------------------ the family interface

    def check_supported(self, model) -> None:
        check_supported(model, self.model_class, "LLaVA-1.5")

    def tokens_before(self, inputs) -> list[int]:
        return [self.num_patches] * inputs["input_ids"].shape[0]

    def compress(
        self, inputs, method: Method, budget: Budget, text_queries: list[str] | None, per_tile: bool = False
    ) -> tuple[list[Selection], dict[str, float]]:
        """One grid per image, so ``per_tile`` changes nothing: the method sees the whole batch at once.
        An in-tower method (``in_tower``) reduces the tokens inside the tower instead (``compress_in_tower``)."""
        if getattr(method, "in_tower", False):
            return self.compress_in_tower(inputs["pixel_values"], method, budget)
        grid = method.input_grid(budget, self.grid)
        signals, signals_ms = timed(
            self.signals, inputs["pixel_values"], method.needs, method.attention, text_queries, grid=grid, text=method.text
        )
        selections, select_ms = timed(method.select, signals, budget)
        return selections, {"signals_ms": signals_ms, "select_ms": select_ms}

    @torch.no_grad()
    def compress_in_tower(
        self, pixel_values: torch.Tensor, method: Method, budget: Budget
    ) -> tuple[list[Selection], dict[str, float]]:
        """The tower's layers up to the feature layer run by ``tower_loop.run_tower`` with the method's reducer
        in each; the feature layer's tokens are the output (their count checked against the budget)."""
        if not torch.isfinite(pixel_values).all():
            raise VTCError("pixel_values contain NaN or inf")
        budget = Budget.parse(budget)
        method.check_budget(budget, self.num_patches)
        reducer = method.reducer(budget, self.num_patches, self.feature_index, self.prefix)
        dtype = self.tower.embeddings.patch_embedding.weight.dtype
        layers = self.tower.encoder.layers[: self.feature_index]
        state, tower_ms = timed(
            run_tower, layers, self.embed(pixel_values.to(dtype), False), reducer, self.prefix, self.num_heads
        )
        selections, select_ms = timed(state.selections)
        for selection in selections:  # what the reducer chose for the whole batch (ToMe: r per layer)
            selection.info = {**(selection.info or {}), **getattr(reducer, "info", {}),
                              "tower_layer_tokens": [list(t) for t in state.layer_tokens]}
        if any(s.num_tokens != budget.tokens(self.num_patches) for s in selections):
            raise VTCError(f"'{method.name}' ended with {selections[0].num_tokens} tokens, not the budget's "
                           f"{budget.tokens(self.num_patches)}")
        return selections, {"signals_ms": tower_ms, "select_ms": select_ms}

    def map_panels(self, selection: Selection) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [("patches", torch.arange(self.num_patches), grid_boxes(self.grid))]


def grid_boxes(grid: tuple[int, int], x0: float = 0.0, y0: float = 0.0, x1: float = 1.0, y1: float = 1.0) -> torch.Tensor:
    """(h*w, 4) raster-order boxes of an h x w grid laid over the rectangle (x0, y0)-(x1, y1)."""
    h, w = grid
    ys = torch.linspace(y0, y1, h + 1, dtype=torch.float64)
    xs = torch.linspace(x0, x1, w + 1, dtype=torch.float64)
    top, left = ys[:-1].repeat_interleave(w), xs[:-1].repeat(h)
    bottom, right = ys[1:].repeat_interleave(w), xs[1:].repeat(h)
    return torch.stack([left, top, right, bottom], dim=1)
