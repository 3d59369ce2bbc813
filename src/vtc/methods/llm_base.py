"""In-LLM methods: drop image tokens between decoder layers, scored from the language model's own states.

An ``LLMMethod`` is pure selection logic. It says, for N image tokens entering the LLM
and a budget, which layers it prunes before and how many image tokens survive each
stage (``plan``), and, at each stage, which image rows to keep (``choose``) from what a
``StageContext`` offers: the pruning layer's input, the previous layer's input, and
attention rows of any layer computed from its q/k (never the full matrix, SDPA stays on).
The mechanism that removes rows, keeps RoPE positions and shrinks the KV cache lives in
``vtc.models.llm_prune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from .base import AttentionSpec, Budget, VTCError
from .primitives import top_in_raster_order


@dataclass(frozen=True)
class Stage:
    """Before decoder layer ``layer`` runs, keep ``keep`` of the image tokens (per sample).

    ``share``: when set, the stage keeps ``int(share * current image tokens)`` and ``keep`` is
    the planned value of that count (FEATHER's second stage depends on how many the first kept).
    """

    layer: int
    keep: int
    share: float | None = None


class StageContext(Protocol):
    """What a method can read at a stage (see vtc.models.llm_prune.PruneContext)."""

    hidden: torch.Tensor  # (B, L, D) input of the pruning layer (current rows)
    previous: torch.Tensor  # (B, L, D) input of the layer before it (same rows)
    image_rows: list[torch.Tensor]  # per sample: row indices of its (current) image tokens, in order
    text_rows: list[torch.Tensor]  # per sample: rows after the image (question + assistant prefix)
    last_row: int  # the last prompt token (same row for every sample)

    def attention(self, layer: int, states: torch.Tensor, queries: list[torch.Tensor], rope: bool = True,
                  keys: list[torch.Tensor] | None = None) -> list[torch.Tensor]: ...

    def keys(self, layer: int, states: torch.Tensor, rope: bool = True) -> torch.Tensor: ...

    def final_norm(self, states: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Choice:
    """Per sample: image rows to keep (current row indices) and optional merged tokens with their positions."""

    keep: torch.Tensor
    merged: torch.Tensor | None = None  # (m, D) new hidden rows
    merged_positions: torch.Tensor | None = None  # (m,) original sequence positions they take
    info: dict[str, Any] = field(default_factory=dict)


class LLMMethod:
    """Base class of in-LLM pruning methods."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    code: ClassVar[str] = ""
    in_llm: ClassVar[bool] = True
    supports_auto: ClassVar[bool] = False
    pairwise: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"llm"})
    attention: ClassVar[AttentionSpec] = AttentionSpec()
    budget_meaning: ClassVar[str] = "image tokens kept after the pruning layer"

    def plan(self, n_image: int, num_layers: int, budget: Budget) -> list[Stage]:  # pragma: no cover - interface
        raise NotImplementedError

    def choose(self, index: int, stages: list[Stage], ctx: StageContext) -> list[Choice]:  # pragma: no cover - interface
        """Stage ``index`` (per-sample ``stages``): one Choice per sample."""
        raise NotImplementedError

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]

    @staticmethod
    def check_layers(layers: tuple[int, ...], num_layers: int, name: str) -> None:
        if any(not 1 <= l < num_layers for l in layers) or list(layers) != sorted(set(layers)):
            raise VTCError(f"{name}: pruning layers {list(layers)} must be increasing and within 1..{num_layers - 1} for a {num_layers}-layer LLM")


def average_tokens(stages: list[Stage], n_image: int, num_layers: int) -> float:
    """Image tokens per layer, averaged over all decoder layers (how multi-stage papers state budgets)."""
    counts, current, prev = [], n_image, 0
    for stage in stages:
        counts += [current] * (stage.layer - prev)
        current, prev = stage.keep, stage.layer
    counts += [current] * (num_layers - prev)
    return sum(counts) / num_layers


def top_rows(scores: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` rows with the highest scores, back in sequence order (ties: earlier row first)."""
    return rows[top_in_raster_order(scores, k)].sort().values


def budget_for_average(method: LLMMethod, target: float, n_image: int, num_layers: int) -> Budget:
    """The budget under which ``method`` keeps ``target`` image tokens per layer on average (papers' comparison unit)."""
    direct = Budget.parse(int(round(target)))
    try:
        if abs(average_tokens(method.plan(n_image, num_layers, direct), n_image, num_layers) - target) <= 1:
            return direct
    except VTCError:
        pass
    lo, hi = 1, n_image  # the budget counts tokens kept after a stage: search the count that gives the average
    try:
        while lo < hi:
            mid = (lo + hi) // 2
            if average_tokens(method.plan(n_image, num_layers, Budget.parse(mid)), n_image, num_layers) < target:
                lo = mid + 1
            else:
                hi = mid
        if abs(average_tokens(method.plan(n_image, num_layers, Budget.parse(lo)), n_image, num_layers) - target) > 1:
            raise VTCError("no count reaches it")
    except VTCError:
        raise VTCError(f"{method.name}: a layer average of {target:g} image tokens is out of reach of its stage layers "
                       f"(pass earlier ones with layers=...)") from None
    return Budget.parse(lo)


class PlanOverride(LLMMethod):
    """Runs ``method``'s selection with a given list of keep counts at layers 1..S (speed measurements on a shallow model)."""

    def __init__(self, method: LLMMethod, keeps: list[int]):
        self.method, self.keeps = method, keeps
        self.name = method.name

    def plan(self, n_image, num_layers, budget):
        if len(self.keeps) + 1 > num_layers:
            raise VTCError(f"{self.name}: {len(self.keeps)} stages need at least {len(self.keeps) + 1} decoder layers")
        return [Stage(i + 1, k) for i, k in enumerate(self.keeps)]

    def choose(self, index, stages, ctx):
        return self.method.choose(index, stages, ctx)
