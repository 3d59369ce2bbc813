"""The interface a model family implements, and the registry that picks one from a checkpoint.

A family adapter owns everything model-specific; methods stay model-agnostic (they see
``Signals`` and a ``Budget``, nothing else). What an adapter provides:

- ``compress``: the declared signals from the vision tower in one forward, only as deep as
  needed, SDPA kept (q/k hooks, never the full attention matrix), then the method's selection.
  A family whose images are several grids (LLaVA-NeXT tiles) decides here how a budget splits.
- ``tokens_before``: how many image tokens the stock model puts in each prompt.
- ``project``: the selected tokens of each image in the language model's space, in prompt
  order, with any layout tokens the model expects (LLaVA-NeXT's newline rows).
- ``splice_ids``: the prompt ids and attention mask rebuilt for K tokens per image.
- ``image_inputs``: the argument that makes stock ``forward``/``generate`` use those tokens.
- ``generation_inputs``: any other argument the spliced prompt needs (Qwen-VL: its 3-D positions).
- ``language_model``: the decoder whose layers the in-LLM methods hook.
- ``map_panels``: where each candidate token of an image lies in the picture (token maps).

Adding a family is one file under ``models/`` plus its tests:

1. subclass ``Family``; set ``name``, ``model_types`` (the ``config.model_type`` values it
   serves) and ``model_class`` (the transformers class that loads it);
2. implement ``check_supported``, ``compress`` (or ``signals`` for a single-grid family, and
   the default ``compress`` runs it), ``tokens_before``, ``project`` and ``map_panels``;
   override ``load`` when ``AutoProcessor`` cannot build the processor here (video processors
   need torchvision);
3. decorate it with ``@register_family``; ``Pipeline.from_pretrained`` then finds it by the
   checkpoint's ``model_type``;
4. tests (tiny random model saved and loaded back): ``none`` equals stock ``generate``,
   pruning equals masking, a mixed batch equals single runs, every method runs or refuses.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from ..env import check_torchvision

check_torchvision()  # before transformers: a torchvision that cannot load fails there with a traceback

from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from ..methods.base import Budget, Method, Selection, VTCError  # noqa: E402

FAMILIES: dict[str, type["Family"]] = {}


def register_family(cls: type["Family"]) -> type["Family"]:
    for model_type in cls.model_types:
        FAMILIES[model_type] = cls
    return cls


def family_for(model_type: str) -> type["Family"]:
    """The adapter class serving checkpoints of ``model_type``, or a clear refusal listing the supported ones."""
    _load_builtin_families()
    if model_type not in FAMILIES:
        supported = ", ".join(f"'{t}' ({FAMILIES[t].name})" for t in sorted(FAMILIES))
        raise VTCError(f"model type '{model_type}' is not supported; vtc supports {supported}")
    return FAMILIES[model_type]


def family_of_model(model) -> type["Family"]:
    """The adapter class for an already loaded model, chosen by its config's model_type."""
    return family_for(getattr(model.config, "model_type", type(model).__name__))


def families() -> list[type["Family"]]:
    """Every registered family adapter, once each, in registration order."""
    _load_builtin_families()
    return list(dict.fromkeys(FAMILIES.values()))


def _load_builtin_families() -> None:
    from . import llava, llava_next, llava_onevision, qwen_vl  # noqa: F401  (each registers itself)


class Family(ABC):
    """What vtc needs from a vision-language model family (see the module docstring)."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""
    # True when one image is several patch grids (tiles), so a budget may be split per tile.
    tiled: ClassVar[bool] = False
    # True when the adapter runs in-tower methods (models/tower_loop.py); else they are refused.
    tower_hook: ClassVar[bool] = False

    model: torch.nn.Module
    image_token_id: int

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype, device: torch.device):
        """(model, processor) from a saved checkpoint; the processor built without torchvision."""
        import transformers
        from transformers import AutoProcessor

        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(path, backend="pil")
        return model, processor

    @classmethod
    def support(cls, method: Method) -> tuple[bool, str]:
        """(served, how): how the family runs ``method`` ("one grid", "global or per tile", ...), or why it refuses."""
        if getattr(method, "in_llm", False):
            return True, "in the LLM"
        if getattr(method, "in_tower", False):
            return cls.tower_support()
        return True, "one grid"

    @classmethod
    def tower_support(cls) -> tuple[bool, str]:
        """How an in-tower method (one that reduces tokens between the vision tower's layers) is served."""
        if cls.tower_hook:
            return True, "inside the vision tower"
        return False, f"it reduces tokens inside the vision tower, and vtc's in-tower hook is not wired for {cls.name}"

    def refuse_unsupported(self, method: Method) -> None:
        served, why = self.support(method)
        if not served:
            raise VTCError(f"'{method.name}' is not supported on {self.name}: {why}")

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @abstractmethod
    def tokens_before(self, inputs) -> list[int]:
        """Image tokens the stock model puts in each prompt of the batch."""

    @abstractmethod
    def compress(
        self, inputs, method: Method, budget: Budget, text_queries: list[str] | None, per_tile: bool = False
    ) -> tuple[list[Selection], dict[str, float]]:
        """Signals + selection for a batch of processor inputs: one Selection per image, and timings (ms)."""

    @abstractmethod
    def project(self, selections: list[Selection]) -> list[torch.Tensor]:
        """Each image's tokens as the language model receives them, in prompt order."""

    @abstractmethod
    def map_panels(self, selection: Selection) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The token-map panels of one image: (title, candidate indices, (n, 4) boxes as fractions of the
        picture, x0 y0 x1 y1). One panel per view of the picture (LLaVA-NeXT: the base crop, the tiles)."""

    def splice_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, counts: list[int], pad_token_id: int,
        expected: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rebuild input_ids / attention_mask with ``counts[b]`` image placeholders in sample b, left-padded.

        ``expected[b]``: the placeholder count the processor wrote (default: ``tokens_before`` of a
        single-grid family); a prompt with another count, or with a broken run, is refused.
        """
        rows = []
        for b, k in enumerate(counts):
            ids = input_ids[b][attention_mask[b].bool()]
            positions = (ids == self.image_token_id).nonzero().squeeze(1)
            want = self.num_patches if expected is None else expected[b]
            if positions.numel() != want:
                raise VTCError(
                    f"sample {b} has {positions.numel()} image placeholder tokens, expected {want} "
                    "(exactly one image per prompt, expanded by the model's processor)"
                )
            start, end = int(positions[0]), int(positions[-1]) + 1
            if end - start != want:
                raise VTCError(f"sample {b}: the image placeholder tokens are not contiguous")
            image = torch.full((k,), self.image_token_id, dtype=ids.dtype)
            rows.append(torch.cat([ids[:start], image, ids[end:]]))
        width = max(r.numel() for r in rows)
        new_ids = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype)
        new_mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
        for b, row in enumerate(rows):
            new_ids[b, width - row.numel() :] = row
            new_mask[b, width - row.numel() :] = 1
        return new_ids.to(input_ids.device), new_mask.to(input_ids.device)

    def generation_inputs(self, inputs, selections: list[Selection], input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> dict:
        """Extra arguments for stock forward/generate on the spliced prompt (Qwen-VL: its M-RoPE position_ids)."""
        return {}

    @staticmethod
    def image_inputs(projected: list[torch.Tensor]) -> dict:
        """The ``mm_encoder_outputs`` argument that makes stock forward/generate use our tokens."""
        return {"image": BaseModelOutputWithPooling(pooler_output=projected)}


def timed(fn, *args, **kwargs):
    """(result, milliseconds)"""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e3
