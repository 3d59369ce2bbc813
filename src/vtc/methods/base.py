"""The types every compression method speaks: Budget, Signals, Selection, and the registry.

A method is pure tensor code. It declares which signals it reads (``needs``) and
from which vision layer (``attention``), the model adapter computes exactly
those in one vision-tower forward, and the method returns one ``Selection`` per
image: the K output tokens (in the pre-projector feature space) plus, for every
output token, where it came from.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, ClassVar, Literal

import torch

from .primitives import gather_rows

# ----------------------------------------------------------------------------- errors


class VTCError(ValueError):
    """Bad input to vtc: the message names the input and what is wrong with it."""


# ----------------------------------------------------------------------------- budget

BudgetLike = "Budget | int | float | str"
# A plain decimal number as a budget string may be written: 64, +64, 0.5, .5, 1., 1e-1, 2.5E-2 (no inf, nan, 1_000).
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?", re.ASCII)


@dataclass(frozen=True)
class Budget:
    """How many visual tokens to send to the language model.

    * ``Budget.parse(64)``      -> a fixed count of 64 tokens,
    * ``Budget.parse(0.111)``   -> a ratio of the image's N patch tokens, in (0, 1],
    * ``Budget.parse("auto")``  -> the method's own dynamic rule (where it has one).

    A ratio r gives ``round(r * N)`` tokens (at least 1). Strings follow how the number
    is written, not its value: only digits (``"64"``, ``" 64 "``, ``"+64"``) is a count;
    a decimal point or an exponent makes a ratio (``"1.0"`` is all N tokens, ``"1"`` is
    one token; ``"0.5"``, ``"1e-1"``, ``"1e0"`` are ratios, as ``str()`` of a small ratio
    such as ``"1e-05"`` reads back); ``"11%"`` is the ratio 0.11; ``"auto"`` in any case.
    A decimal or exponent above 1 (``"64.0"``, ``"1e2"``) is an error that suggests the
    count to write instead, never 100 tokens by guess; so are ``"inf"``, ``"nan"``,
    ``"1_000"``, ``"0x40"`` and other strings that are not plain decimal numbers.
    """

    kind: Literal["count", "ratio", "auto"]
    value: float | int | None = None

    @classmethod
    def parse(cls, budget: Any) -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, bool) or budget is None:
            raise VTCError(f"budget {budget!r}: expected a token count (64), a ratio (0.111) or 'auto'")
        if isinstance(budget, str):
            return cls._parse_text(budget)
        if isinstance(budget, numbers.Integral) and not isinstance(budget, int):  # numpy ints: the same count
            budget = int(budget)
        elif isinstance(budget, numbers.Real) and type(budget) is not float and not isinstance(budget, int):
            budget = float(budget)  # numpy floats (np.float64 subclasses float, np.float32 does not)
        if isinstance(budget, int):
            if budget <= 0:
                raise VTCError(f"budget {budget}: a token count must be at least 1")
            return cls("count", budget)
        if isinstance(budget, float):
            if not math.isfinite(budget) or budget <= 0 or budget > 1:
                raise VTCError(f"budget {budget}: a ratio must be in (0, 1]; pass an int for a token count")
            return cls("ratio", budget)
        raise VTCError(f"budget {budget!r}: unsupported type {type(budget).__name__}")

    @classmethod
    def _parse_text(cls, budget: str) -> "Budget":
        text = budget.strip().lower()
        if text == "auto":
            return cls("auto")
        percent = text.endswith("%")
        digits = text[:-1].strip() if percent else text
        if not _DECIMAL.fullmatch(digits):
            raise VTCError(
                f"budget {budget!r}: expected a token count (64), a ratio (0.111), a percentage (11%) or 'auto'"
            )
        if percent:
            return cls._text_ratio(budget, float(digits) / 100.0, hint="")
        if digits.lstrip("+-").isdigit():  # written as a whole number: a count ("1" is one token)
            return cls.parse(int(digits))
        return cls._text_ratio(budget, float(digits))  # a decimal point or an exponent: a ratio ("1.0" is all)

    @classmethod
    def _text_ratio(cls, budget: str, ratio: float, hint: str | None = None) -> "Budget":
        if 0 < ratio <= 1:
            return cls("ratio", ratio)
        if hint is None:  # "64.0" or "1e2": say which count was probably meant
            hint = f"; write {int(ratio)} for a token count" if ratio > 1 and ratio.is_integer() else ""
        raise VTCError(f"budget {budget!r} reads as the ratio {ratio:g}, but a ratio must be in (0, 1]{hint}")

    @property
    def is_auto(self) -> bool:
        return self.kind == "auto"

    def tokens(self, n: int) -> int:
        """The fixed number of output tokens for an image of ``n`` patch tokens."""
        if self.kind == "auto":
            raise VTCError("budget 'auto' has no fixed token count; the method decides it per image")
        if self.kind == "count":
            if self.value > n:
                raise VTCError(f"budget {self.value} tokens is more than the image's {n} patch tokens")
            return int(self.value)
        return max(1, min(n, round(self.value * n)))

    def __str__(self) -> str:
        return "auto" if self.kind == "auto" else str(self.value)


# ----------------------------------------------------------------------------- signals


class Signal:
    """Names of the signals a method may declare in ``needs``."""

    FEATURES = "features"  # (B, N, D) patch states of LLaVA's feature layer (-2): what is kept / merged
    CLS_ATTN = "cls_attn"  # (B, N) the CLS query's attention over the patches, at ``attention.layer``
    KEYS = "keys"  # (B, N, Dk) patch keys at ``attention.layer``
    TEXT_SIM = "text_sim"  # (B, N) cosine(question's CLIP text embedding, projected final (or feature-layer) patch states), or with
    # text_source="llm" the question's tokens in the LM's input-embedding table against the projected image tokens
    PROJECTED = "projected"  # (B, N, Dllm) patch features after the multimodal projector
    RECEIVED_ATTN = "received_attn"  # (B, N) attention each patch receives, averaged over the patch queries
    CLS_FEATURE = "cls_feature"  # (B, D) the CLS token's state at the feature layer (not a patch)
    # (B, N) the CLS query's attention over the patches at a SHALLOW layer (``attention.shallow``), read in
    # the same tower forward as CLS_ATTN (VScan's local scan); towers without a CLS token refuse it
    CLS_ATTN_SHALLOW = "cls_attn_shallow"

    PER_PATCH = (FEATURES, CLS_ATTN, KEYS, TEXT_SIM, PROJECTED, RECEIVED_ATTN, CLS_ATTN_SHALLOW)
    ALL = PER_PATCH + (CLS_FEATURE,)


@dataclass(frozen=True)
class AttentionSpec:
    """Which vision layer's q/k a method reads, and how heads are combined.

    ``heads``: ``"single"`` recomputes attention as one head over the full width
    with scale 1/sqrt(D) (PruMerge's and Recoverable Compression's form);
    ``"mean"``/``"sum"`` use the model's own heads and reduce the per-head rows.
    ``keys``: ``"full"`` is the k_proj output (D wide); ``"head_mean"`` averages heads (head_dim wide).
    ``shallow``: where CLS_ATTN_SHALLOW is read, as a share of the tower's depth: encoder layer
    ceil(shallow * depth) - 1 (0.25 of CLIP-L's 24 layers: layer 5, the 6th), heads as ``heads``.
    ``received``: RECEIVED_ATTN over ``"all"`` the patch queries, or over the ``"others"``: each patch's
    attention to itself left out, the mean taken over the N - 1 other patches (VisionTrim's reading).
    """

    layer: int = -2
    heads: Literal["single", "mean", "sum"] = "mean"
    keys: Literal["full", "head_mean"] = "full"
    shallow: float = 0.25
    received: Literal["all", "others"] = "all"


@dataclass(frozen=True)
class TextSpec:
    """How TEXT_SIM is computed: which text, how CLIP's text tower reads it, how patches are scored against it.

    The defaults are CLIP's own use: the question, pooled at the end token (attention
    mask on, up to the tower's context), cosine with visual_projection(post_layernorm(
    final patch states)). Recoverable Compression's published code differs in each
    field; ``compat="original"`` sets them (see recoverable.py):

    ``source``: ``"question"``, or ``"prompt_first_line"``: the first line of LLaVA-1.5's
    evaluation prompt decoded with special tokens, the same for every question.
    ``pooling``: ``"eos"``, or ``"last"``: padded to ``max_length`` and read at the last
    position, with no attention mask. ``max_length``: None = the tower's context.
    ``post_layernorm``: apply the vision tower's post_layernorm to the patch states first.
    ``scaled``: multiply the cosine by projection_dim ** -0.5.
    ``patch_states``: which tower states the patches are scored from: ``"final"`` (the last
    layer's, CLIP's own reading) or ``"feature"`` (LLaVA's feature layer, the states the
    projector receives: CDPruner's reading; the tower then stops at the feature layer).
    ``segments``: read a question longer than the text tower's context whole, in context-long
    segments (zero-padded, masked), and score each patch by the mean of its cosines with the
    segments (CDPruner's reading); off, the question is truncated to ``max_length``. A question
    within the context gives the same score either way.

    The LLM-embedding text source (``text_source="llm"``, models/embed_text.py) has no text tower: it
    honours ``source`` and refuses any other field set away from its default, except the two it
    always honours: it scores the projected feature-layer tokens (``patch_states="feature"``) and
    reads the whole question (``segments``).

    ``per_token``: TEXT_SIM is (B, N, 2, W), every question token kept apart (VisionTrim's reading):
    ``[..., 0, :]`` is each patch's vector in the text space, unnormalised (CLIP: visual_projection of
    the patch states; LLM source: the projected token), ``[..., 1, :]`` its dot products with the
    question's unit token embeddings (CLIP: every token's final state through text_projection, BOS
    and EOS included; LLM source: the tokens its pooling counts); both zero-padded to one width W.
    It reads the question truncated to the context, and takes neither ``segments``, ``pooling="last"``
    nor ``scaled``; the LLM source then also accepts ``post_layernorm=False`` (it applies none).
    """

    source: Literal["question", "prompt_first_line"] = "question"
    pooling: Literal["eos", "last"] = "eos"
    max_length: int | None = None
    post_layernorm: bool = True
    scaled: bool = False
    patch_states: Literal["final", "feature"] = "final"
    segments: bool = False
    per_token: bool = False


def all_finite(value: torch.Tensor) -> bool:
    """True when no entry is NaN or inf. A finite sum proves it in one pass without a mask tensor;
    a non-finite sum (NaN/inf inside, or an overflow) falls back to the entrywise check."""
    if not value.is_floating_point():
        return True
    total = value.sum(dtype=torch.float64 if value.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(value).all())


@dataclass
class Signals:
    """What the adapter computed for a batch of B images with N patch tokens each."""

    features: torch.Tensor
    grid: tuple[int, int]
    cls_attn: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text_sim: torch.Tensor | None = None
    projected: torch.Tensor | None = None
    received_attn: torch.Tensor | None = None
    cls_feature: torch.Tensor | None = None
    index: int = 0  # position of the first image in the caller's batch (seeds per-image randomness)
    # The full-resolution patch grid when the tower ran on a downsampled image (else None: same as ``grid``).
    source_grid: tuple[int, int] | None = None
    cls_attn_shallow: torch.Tensor | None = None
    _finite: set[str] = field(default_factory=set, repr=False, compare=False)  # signals checked finite

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_patches(self) -> int:
        return self.features.shape[1]

    @property
    def source_patches(self) -> int:
        """Patch count of the full-resolution image (what budgets and provenance refer to)."""
        h, w = self.source_grid or self.grid
        return h * w

    def require(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise VTCError(f"signal '{name}' was not computed; declare it in the method's `needs`")
        return value

    def validate(self, names: "frozenset[str] | None" = None) -> None:
        """Shape checks on every signal, and finiteness of ``names`` (default: every signal present).

        Finiteness is checked once per Signals object and signal: the adapter checks what it
        computes as it makes it, so ``Method.select`` pays for shapes only. A signal changed
        in place after it was checked is not checked again.
        """
        if self.features.ndim != 3:
            raise VTCError(f"features must be (B, N, D), got shape {tuple(self.features.shape)}")
        b, n, _ = self.features.shape
        if self.grid[0] * self.grid[1] != n:
            raise VTCError(f"patch grid {self.grid} does not hold the {n} patch tokens")
        for name in Signal.ALL:
            value = getattr(self, name)
            if value is None:
                continue
            expected = (b,) if name == Signal.CLS_FEATURE else (b, n)
            if value.shape[: len(expected)] != expected:
                raise VTCError(f"signal '{name}' has shape {tuple(value.shape)}, expected {expected + ('...',)}")
        for name in Signal.ALL if names is None else names:
            value = getattr(self, name)
            if value is None or name in self._finite:
                continue
            if not all_finite(value):
                raise VTCError(f"signal '{name}' contains NaN or inf values")
            self._finite.add(name)

    def image(self, b: int) -> "Signals":
        """The signals of image ``b`` alone (batch of one), for per-image algorithms."""
        pick = lambda t: None if t is None else t[b : b + 1]  # noqa: E731
        return Signals(
            features=self.features[b : b + 1],
            grid=self.grid,
            cls_attn=pick(self.cls_attn),
            keys=pick(self.keys),
            text_sim=pick(self.text_sim),
            projected=pick(self.projected),
            received_attn=pick(self.received_attn),
            cls_feature=pick(self.cls_feature),
            cls_attn_shallow=pick(self.cls_attn_shallow),
            index=self.index + b,
            source_grid=self.source_grid,
            _finite=set(self._finite),
        )


# ----------------------------------------------------------------------------- selection


class Origin(IntEnum):
    """Why an output token exists."""

    KEPT = 0  # a patch kept for visual salience (or by a query-agnostic rule)
    RECOVERED = 1  # a patch recovered because the question's text points at it
    MERGED = 2  # a new token merged from several patches
    GLOBAL = 3  # a token tied to no patch (e.g. the CLS token VisionZip keeps)


class Selection:
    """The compressed tokens of one image, with provenance.

    ``tokens``  (K, D)  output tokens, in the same feature space as ``Signals.features``
    ``origin``  (K,)    ``Origin`` code of each output token
    ``sources`` K lists of the patch indices each output token draws on
    ``owner``   (N,)    for every input patch, the output token that represents it
                        (-1 where the patch was dropped). Each patch has exactly one
                        owner: kept patches own themselves; a merged patch belongs to
                        the first merged token (in output order) that draws on it.
    ``info``    method-specific numbers (e.g. the auto ratios it chose)

    ``layout``  set by a tiled family's adapter: where the image's patches sit (None: one grid)

    Provenance is stored flat (``source_index``: every token's sources one after the
    other; ``source_sizes``: how many each token has), so building a Selection costs a
    few tensor operations whatever K is; the ``sources`` list is made on first use.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        origin: torch.Tensor,
        sources: "list[torch.Tensor] | None" = None,
        owner: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
        *,
        source_index: torch.Tensor | None = None,
        source_sizes: torch.Tensor | None = None,
    ):
        if (sources is None) == (source_index is None or source_sizes is None):
            raise VTCError("Selection needs either a sources list or source_index with source_sizes")
        if owner is None:
            raise VTCError("Selection needs the owner map")
        self.tokens, self.origin, self.owner = tokens, origin, owner
        self.info = dict(info or {})
        self.layout: Any = None
        self._sources = None if sources is None else list(sources)
        if sources is not None:
            source_sizes = torch.tensor([len(s) for s in sources], dtype=torch.long)
            source_index = torch.cat([torch.as_tensor(s).reshape(-1).long() for s in sources]) if sources else origin[:0].long()
        self.source_index, self.source_sizes = source_index, source_sizes

    @property
    def sources(self) -> list[torch.Tensor]:
        if self._sources is None:
            self._sources = list(torch.split(self.source_index, self.source_sizes.tolist()))
        return self._sources

    def __repr__(self) -> str:
        return f"Selection({self.num_tokens} tokens of {self.num_patches} patches, {self.counts()})"

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_patches(self) -> int:
        return self.owner.shape[0]

    def kept_indices(self) -> torch.Tensor:
        """Patch indices kept as they are (visual or recovered), in output order."""
        single = (self.origin == Origin.KEPT) | (self.origin == Origin.RECOVERED)
        starts = self.source_sizes.cumsum(0) - self.source_sizes
        return self.source_index[starts[single]]

    def counts(self) -> dict[str, int]:
        return {o.name.lower(): int((self.origin == o).sum()) for o in Origin}

    @classmethod
    def from_kept(
        cls, features: torch.Tensor, kept: torch.Tensor, info: "list[dict[str, Any]] | None" = None
    ) -> "list[Selection]":
        """One Selection per image for methods that keep patches and merge nothing: ``features`` (B, N, D),
        ``kept`` (B, k) patch indices in output order. Equal to ``build(features[b], kept[b])`` per image."""
        return cls.build_batch(features, kept, info=info)

    @classmethod
    def build_batch(
        cls,
        features: torch.Tensor,
        kept: torch.Tensor,
        kept_origin: torch.Tensor | int = Origin.KEPT,
        merged_tokens: torch.Tensor | None = None,
        merged_sources: "tuple[torch.Tensor, torch.Tensor] | None" = None,
        merged_anchors: torch.Tensor | None = None,
        info: "dict[str, Any] | list[dict[str, Any]] | None" = None,
        global_tokens: torch.Tensor | None = None,
    ) -> "list[Selection]":
        """``build`` for a whole batch whose images have the same counts, in a fixed number of tensor
        operations (the per-image loop only slices): ``features`` (B, N, D); ``kept`` (B, k);
        ``kept_origin`` (B, k) or one code; ``merged_tokens`` (B, M, D); ``merged_sources`` flat as
        ((B, F) indices, (B, M) sizes), each row's sizes summing to F; ``merged_anchors`` (B, M), -1 for
        none; ``global_tokens`` (B, G, D); ``info`` one dict for every image or one per image.
        Image b's Selection equals ``build(features[b], kept[b], ...)`` with its rows of each argument."""
        b, n = features.shape[:2]
        kept = kept.to(torch.long)
        k, dev = kept.shape[1], kept.device
        g = 0 if global_tokens is None else global_tokens.shape[1]
        m = 0 if merged_tokens is None else merged_tokens.shape[1]
        parts = [gather_rows(features, kept)]
        if g:
            parts.insert(0, global_tokens.to(features.dtype))
        if m:
            parts.append(merged_tokens.to(features.dtype))
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        origin = torch.empty((b, g + k + m), dtype=torch.long, device=dev)
        origin[:, :g], origin[:, g + k :] = int(Origin.GLOBAL), int(Origin.MERGED)
        origin[:, g : g + k] = kept_origin if isinstance(kept_origin, int) else kept_origin.to(torch.long)
        sizes = torch.ones((b, g + k + m), dtype=torch.long, device=dev)
        sizes[:, :g] = 0
        owner = torch.full((b, n), -1, dtype=torch.long, device=dev)
        owner.scatter_(1, kept, torch.arange(g, g + k, device=dev).expand(b, k))
        source_index = kept
        if m:
            if merged_sources is None or merged_sources[1].shape[1] != m:
                raise AssertionError("every output token needs a source list")
            flat, merged_sizes = merged_sources[0].to(torch.long), merged_sources[1].to(torch.long)
            sizes[:, g + k :] = merged_sizes
            if merged_anchors is not None:  # anchors claim themselves before any merged token claims its sources
                anchors = merged_anchors.to(torch.long)
                ids = torch.arange(g + k, g + k + m, device=dev).expand(b, m)
                owner = _claim_unowned(owner, anchors.clamp(min=0), torch.where(anchors >= 0, ids, _UNCLAIMED))
            # each flat entry's merged token: the count of tokens whose sources end at or before it
            ends = merged_sizes.cumsum(1)
            position = torch.arange(flat.shape[1], device=dev).expand(b, -1).contiguous()
            token_of_entry = g + k + torch.searchsorted(ends, position, right=True)
            owner = _claim_unowned(owner, flat, token_of_entry)
            source_index = torch.cat([kept, flat], dim=1)
        infos = info if isinstance(info, list) else [info] * b
        return [
            cls(tokens[i], origin[i], owner=owner[i], info=infos[i], source_index=source_index[i], source_sizes=sizes[i])
            for i in range(b)
        ]

    @classmethod
    def from_partition(cls, tokens: torch.Tensor, owner: torch.Tensor, sizes: torch.Tensor) -> "list[Selection]":
        """One Selection per image for methods that split every patch into exactly one output token (merging
        methods with nothing dropped, e.g. ToMe): ``tokens`` (B, T, D) in output order, ``owner`` (B, N) the
        output token of each patch, ``sizes`` (B, T) how many patches each token has. A one-patch token is a
        kept patch, a larger one a merged token whose sources are its patches in raster order: equal to
        ``build(features[b], kept, merged_tokens=..., merged_sources=...)`` when the kept tokens come first, in
        raster order. The same shapes for every image, so the whole batch is a fixed number of operations."""
        b, n = owner.shape
        raster = torch.arange(n, device=owner.device).expand(b, n)
        source_index = (owner * n + raster).sort(dim=-1).indices  # token after token, each one's patches ascending
        sizes = sizes.to(torch.long)
        origin = torch.where(sizes == 1, int(Origin.KEPT), int(Origin.MERGED))
        return [
            cls(tokens[i], origin[i], owner=owner[i], source_index=source_index[i], source_sizes=sizes[i])
            for i in range(b)
        ]

    @classmethod
    def build(
        cls,
        features: torch.Tensor,
        kept: torch.Tensor,
        kept_origin: torch.Tensor | int = Origin.KEPT,
        merged_tokens: torch.Tensor | None = None,
        merged_sources: "list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor] | None" = None,
        merged_anchors: "list[int] | torch.Tensor | None" = None,
        info: dict[str, Any] | None = None,
        global_tokens: torch.Tensor | None = None,
    ) -> "Selection":
        """Assemble a Selection from kept patch indices and optional merged tokens.

        ``features`` (N, D) of one image; ``kept`` (k,) patch indices in output order;
        merged tokens come after the kept ones; ``merged_sources`` lists each one's patches, as a
        list of index tensors or flat as (indices one token after the other, sizes). ``merged_anchors`` names, per merged
        token, the patch it is built around (its center; -1 for none): an anchor
        owns itself before other merged tokens claim their remaining sources.

        The claim rule is ``build_batch``'s, written for one image on its own: methods whose images keep
        different counts call this once per image, and this form takes half the time of a batch of one.
        """
        n = features.shape[0]
        kept = kept.to(torch.long).reshape(-1)
        k = kept.numel()
        if isinstance(kept_origin, int):
            kept_origin = torch.full((k,), int(kept_origin), dtype=torch.long)
        if isinstance(merged_sources, tuple):  # already flat: (all sources one after the other, sizes)
            merged_flat, merged_sizes = merged_sources[0].to(torch.long), merged_sources[1].to(torch.long)
        else:
            merged_sources = merged_sources or []
            merged_sizes = torch.tensor([len(s) for s in merged_sources], dtype=torch.long)
            merged_flat = torch.cat(merged_sources).to(torch.long) if merged_sources else kept[:0]
        m = merged_sizes.numel()
        g = 0 if global_tokens is None else global_tokens.shape[0]
        rows = features.index_select(0, kept)  # faster than features[kept] on the CPU
        parts = [rows] if g == 0 else [global_tokens.to(features.dtype), rows]
        if merged_tokens is not None and merged_tokens.shape[0] > 0:
            parts.append(merged_tokens.to(features.dtype))
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tokens.shape[0] != g + k + m:
            raise AssertionError("every output token needs a source list")
        owner = torch.full((n,), -1, dtype=torch.long)
        owner[kept] = torch.arange(g, g + k)
        if g == 0 and m == 0:  # kept patches only: the common case, a few operations
            return cls(tokens, kept_origin.to(torch.long), owner=owner, info=info, source_index=kept,
                       source_sizes=torch.ones(k, dtype=torch.long))
        origin = torch.cat(
            [torch.full((g,), int(Origin.GLOBAL)), kept_origin.to(torch.long), torch.full((m,), int(Origin.MERGED))]
        )
        sizes = torch.cat([torch.zeros(g, dtype=torch.long), torch.ones(k, dtype=torch.long), merged_sizes])
        if m:
            merged_ids = g + k + torch.arange(m)
            if merged_anchors is not None:  # anchors claim themselves before any merged token claims its sources
                anchors = torch.as_tensor(merged_anchors, dtype=torch.long)
                claimed = anchors >= 0
                owner = _claim_unowned(owner, anchors[claimed], merged_ids[claimed])
            owner = _claim_unowned(owner, merged_flat, merged_ids.repeat_interleave(merged_sizes))
        return cls(
            tokens, origin, owner=owner, info=info, source_index=torch.cat([kept, merged_flat]), source_sizes=sizes
        )


_UNCLAIMED = torch.iinfo(torch.long).max  # a token id larger than every real one: claims nothing


def _claim_unowned(owner: torch.Tensor, patches: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Every patch still unowned goes to the first token (lowest id) that lists it: the result of
    claiming in output order, one token after the other. Works on one image ((N,) owner) or a batch
    ((B, N) owner, (B, P) patches and ids); an id of ``_UNCLAIMED`` claims nothing."""
    if patches.numel() == 0:
        return owner
    first = torch.full_like(owner, _UNCLAIMED)
    first.scatter_reduce_(-1, patches, token_ids, reduce="amin")
    return torch.where((owner < 0) & (first != _UNCLAIMED), first, owner)


# ----------------------------------------------------------------------------- methods


class Method:
    """Base class of a compression method. Subclasses set the class attributes and implement ``select_one``
    (one image) or ``select`` (a whole batch, when it can be vectorised)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({Signal.FEATURES})
    attention: ClassVar[AttentionSpec] = AttentionSpec()
    supports_auto: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""
    # True when the algorithm needs token-token similarity and so builds an N x N matrix (e.g. DivPrune).
    pairwise: ClassVar[bool] = False
    # True when the rule reads the patch grid's geometry (pooling regions): on a tiled image it runs per tile.
    spatial: ClassVar[bool] = False
    # How TEXT_SIM is computed (which text, pooling, patch-side scoring); only read by methods that need it.
    text: TextSpec = TextSpec()

    @property
    def text_source(self) -> str:
        return self.text.source

    def select(self, signals: Signals, budget: Budget) -> list[Selection]:
        """Compress every image of the batch; returns one Selection per image."""
        return self.select_batch(signals, self.prepare(signals, budget))

    def prepare(self, signals: Signals, budget: Budget | int | float | str) -> Budget:
        """Parse and check the budget and the signals this method reads (every ``select`` runs this once)."""
        budget = Budget.parse(budget)
        self.check_budget(budget, signals.source_patches)
        for name in self.needs:
            signals.require(name)
        signals.validate(self.needs)
        return budget

    def select_batch(self, signals: Signals, budget: Budget) -> list[Selection]:
        """The whole batch after ``prepare``. Default: one image at a time; methods override it with
        tensor code over the batch."""
        if type(self).select_one is Method.select_one:
            raise NotImplementedError(f"method '{self.name}' implements neither select_batch nor select_one")
        return [self.select_one(signals.image(b), budget) for b in range(signals.batch_size)]

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        """One image (a batch of one), budget already parsed. Batched methods get this for free."""
        if type(self).select_batch is Method.select_batch:
            raise NotImplementedError(f"method '{self.name}' implements neither select_batch nor select_one")
        return self.select_batch(signals, budget)[0]

    def keep_masks(self, signals: Signals, counts: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool: the patches this method keeps in image b at its own token count ``counts[b]``, in one
        batched call; None (the default) for methods that do not keep the top of one fixed ranking. Pruning
        methods whose choice at any count is a prefix of one ranking, and whose Selections carry no info,
        override it; text recovery (``X+text``) then re-selects at per-image counts without a loop."""
        return None

    def input_grid(self, budget: Budget, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The patch grid to run the vision tower at, for methods that shrink the input image (else None)."""
        return None

    def check_budget(self, budget: Budget, n: int) -> None:
        if budget.is_auto and not self.supports_auto:
            raise VTCError(
                f"method '{self.name}' has no dynamic rule, so budget 'auto' cannot be honoured; "
                "give a token count (64) or a ratio (0.111)"
            )
        if not budget.is_auto:
            budget.tokens(n)  # raises on a count larger than N

    def describe(self) -> str:
        return (self.__doc__ or "").strip().splitlines()[0] if self.__doc__ else self.name


_REGISTRY: dict[str, Callable[..., Method]] = {}


class InTowerMethod(Method):
    """A method that reduces tokens between the vision tower's layers (models/tower_loop.py): the adapter runs the
    tower with the method's ``reducer(budget, num_patches, depth, prefix)``; there are no finished features to
    select from, so ``select_batch`` refuses. ``tower_verb`` says what it does there ("prunes", "merges")."""

    in_tower = True
    needs = frozenset()  # no after-tower signal: everything happens inside the tower
    tower_verb: ClassVar[str] = "reduces tokens"

    def select_batch(self, signals: "Signals", budget: Budget) -> "list[Selection]":
        raise VTCError(
            f"{self.name} {self.tower_verb} inside the vision tower, so it cannot select from finished features: run it "
            "through a model (vtc run, Pipeline) on LLaVA-1.5"
        )


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register("prumerge")`` makes the method available by name."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method name '{name}' is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_factory(name: str, factory: Callable[..., Method]) -> None:
    """Register a method made by a function (e.g. a preset of another method's options)."""
    if name in _REGISTRY:
        raise ValueError(f"method name '{name}' is registered twice")
    _REGISTRY[name] = factory


def available() -> list[str]:
    """Names of every registered method."""
    return sorted(_REGISTRY)


def get(name: str | Method, **options: Any) -> Method:
    """A method instance by name (options go to its constructor); passes instances through."""
    if not isinstance(name, str):  # an instance (vision-side Method or in-LLM method)
        return name
    if name not in _REGISTRY and name.endswith("+text") and name[: -len("+text")] in _REGISTRY:
        from .recoverable import WithTextRecovery  # composition: any pruning method + text recovery

        base = get(name[: -len("+text")], **options)
        if getattr(base, "in_llm", False):
            raise VTCError(f"'{name}': text recovery composes with vision-side methods, not with in-LLM '{base.name}'")
        if getattr(base, "llm_stage", None) is not None:
            raise VTCError(f"'{name}': '{base.name}' merges every patch into its tokens and prunes again inside the LLM; "
                           "text recovery has no dropped patch to recover")
        if getattr(base, "in_tower", False):
            raise VTCError(f"'{name}': text recovery picks stock feature-layer patches, which in-tower '{base.name}' never computes")
        return WithTextRecovery(base)
    if name not in _REGISTRY:
        raise VTCError(f"unknown method '{name}'; available: {', '.join(available())}")
    try:
        method = _REGISTRY[name](**options)
    except TypeError as exc:
        raise VTCError(f"method '{name}' does not take options {sorted(options)}: {exc}") from None
    method.name = name
    return method
