"""Qwen2-VL and Qwen2.5-VL glue (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Native resolution: an image of H x W pixels gives (H/p) x (W/p) patches (p = 14 in the released
checkpoints); the tower's ``PatchMerger`` merges each 2 x 2 group into one language-model token,
so an image is one grid of (H/2p) x (W/2p) tokens and N depends on the image.

- **Candidates are the merged tokens** (the language model's units) in raster order on their
  (H/2p) x (W/2p) grid; budgets count them; ratios are the natural default across image sizes.
  An image is one grid: ``per_tile`` changes nothing, spatial methods pool on that grid. A batch of
  images of different sizes is grouped by grid, each group selected in one call.
- **FEATURES of a merged token: the merger's input group flattened** (its four pre-merger patch
  states of the last tower block, in the merger's order: (4 * C,)). ``project`` is the stock merger
  (its per-patch norm, then its MLP) on each output token's group, so a kept token is sent exactly
  as the stock model's token (``none`` equals stock ``generate``, pruning equals masking), and a vtc
  merge of several tokens (a weighted mean of their groups, as every method merges features) is
  the merger applied to the mean of the members' 2 x 2 groups: one token in the space the merger
  was trained on, the same rule as LLaVA's "merge features, then project". The mean of the four
  patches (C,) would lose the within-group layout the merger reads and could not be sent exactly.
  Methods that compare features (DivPrune, ToMe, PruMerge+, ...) compare these 4C-wide group
  vectors: patch by patch, top-left with top-left.
- **No CLS token.** ``cls_attn`` is substituted by the attention each merged token receives: the
  attention its four patches receive (summed, so it stays a distribution over the tokens), averaged
  over every patch query of its image, softmax over the image's patches (rotary applied as the
  tower applies it), computed in chunks of query rows by llava.py's ``received_attention``, never
  the whole matrix. It is read at a full-attention layer: Qwen2-VL's every layer; on Qwen2.5-VL the
  last layer of ``fullatt_block_indexes`` at or before the method's ``attention.layer`` (the first
  one if none is before; window layers only see their window). ``keys``: the mean of the four
  patches' raw keys (before rotary, as CLIP's k_proj output). Each Selection's ``info`` says
  ``"cls_attn": "received_attn"`` and ``"attn_layer"``. ``cls_feature`` (VisionZip's kept CLS) is
  refused, naming ``keep_cls=False``.
- **M-RoPE positions are the stock ones.** The full prompt's (t, h, w) positions come from the
  model's ``get_rope_index``. A kept token keeps its position; a token made of several sources takes
  the rounded mean of their positions; the text after the image keeps its positions, so it
  continues exactly as with all tokens. The pruned prompt's ``position_ids`` (4 rows: the text
  position of the pruned sequence, then t, h, w) go to ``generate``, which continues each row by one
  per new token (the stock rule), and ``model.model.rope_deltas`` is set to max position + 1 -
  pruned length, so later decoding steps land where the full prompt's would. Tokens are sent in
  prompt order: kept tokens by position, then merged and global tokens in the method's order.
- **Video** (``pixel_values_videos`` or t > 1 in ``image_grid_thw``) and several images per prompt
  are refused.
- **Text guidance**: only the language-model embedding source (``text_source="llm"``, CLI
  ``--text-source llm``): cosine of the question's tokens in the input-embedding table against the
  merger's output tokens (embed_text.py). A CLIP text scorer is refused.
- **Processor.** ``AutoProcessor`` builds a video processor, which needs torchvision; ``load`` builds
  ``ImageOnlyQwenVLProcessor`` from the PIL image processor, the tokenizer and the chat template.
- **In-LLM methods** hook the Qwen2 decoder layers: their rotary rows are (B, L, head_dim) after the
  3-D sections are recomposed, so gathering the kept rows' (cos, sin) keeps each row's (t, h, w).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import Qwen2VLProcessor

from ..methods.base import AttentionSpec, Budget, Method, Origin, Selection, Signal, Signals, TextSpec, VTCError
from .family import Family, register_family, timed
from .llava import grid_boxes, received_attention


class WithoutVideoProcessor:
    """Mixin: a Qwen-VL processor built without its video processor (which needs torchvision)."""

    processor_class = "Qwen2VLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self):
        return {**super().to_dict(), "processor_class": self.processor_class}


class ImageOnlyQwenVLProcessor(WithoutVideoProcessor, Qwen2VLProcessor):
    """The Qwen2-VL processor without its video processor. Qwen2.5-VL's processor differs only for videos, so it
    serves both; ``processor_class`` says which one it saves as."""


@dataclass
class QwenGrid:
    """One image: its merged-token grid (h, w) and the (3, h*w) M-RoPE positions the stock prompt gives its tokens."""

    grid: tuple[int, int]
    positions: torch.Tensor | None = None

    @property
    def num_candidates(self) -> int:
        return self.grid[0] * self.grid[1]


@register_family
class Qwen2VLAdapter(Family):
    """Signals from, and token splicing into, a stock HF Qwen2-VL model (see the module docstring)."""

    name = "qwen2-vl"
    tower_gap = "a native-resolution tower with 2-D rotary positions (windowed attention in 2.5), a 2x2 merger, no CLS token"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    label = "Qwen2-VL"
    modeling: ClassVar[str] = "transformers.models.qwen2_vl.modeling_qwen2_vl"
    processor_type: ClassVar[type] = ImageOnlyQwenVLProcessor

    def __init__(self, model, text_scorer=None):
        self.check_supported(model)
        self.model = model
        self.tower = model.model.visual
        self.merger = self.tower.merger
        self.text_scorer = text_scorer
        self.image_token_id = model.config.image_token_id
        self.merge = self.tower.spatial_merge_size
        self.num_layers = len(self.tower.blocks)
        self.num_heads = self.tower.config.num_heads
        self.patch_width = self.tower.blocks[0].norm1.weight.shape[0]  # C: one patch state

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype, device: torch.device):
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype).to(device)
        processor_dict, _ = cls.processor_type.get_processor_dict(path)
        parts = [AutoImageProcessor.from_pretrained(path, backend="pil"), AutoTokenizer.from_pretrained(path)]
        processor = cls.processor_type.from_args_and_dict(parts, processor_dict)
        processor.processor_class = cls.model_class.replace("ForConditionalGeneration", "Processor")
        return model, processor

    def check_supported(self, model) -> None:
        import transformers

        if not isinstance(model, getattr(transformers, self.model_class)):
            raise VTCError(
                f"model of class {type(model).__name__} is not supported: vtc's {self.label} adapter needs a "
                f"transformers {self.model_class}"
            )

    @classmethod
    def support(cls, method: Method) -> tuple[bool, str]:
        if getattr(method, "in_llm", False):
            return True, "in the LLM (3-D rotary rows gathered)"
        if getattr(method, "in_tower", False):  # windowed attention and the 2x2 merger are not wired
            return cls.tower_support()
        if type(method).input_grid is not Method.input_grid:
            return False, "it runs the vision tower on a smaller single grid; native-resolution grids are not supported (use 'pool')"
        if Signal.CLS_FEATURE in method.needs:
            return False, "it keeps the CLS token and Qwen-VL's tower has none (VisionZip: keep_cls=False)"
        if Signal.CLS_ATTN_SHALLOW in method.needs:
            return False, "it reads the CLS query's attention at a shallow layer and Qwen-VL's tower has no CLS token"
        how = "one grid of merged tokens"
        if Signal.CLS_ATTN in method.needs:
            how += ", CLS attention = received attention at a full-attention layer"
        if Signal.TEXT_SIM in method.needs:
            how += ", needs the LLM-embedding text source"
        return True, how

    def refuse_missing(self, needs: frozenset[str], who: str = "this method") -> None:
        if Signal.CLS_ATTN_SHALLOW in needs:
            raise VTCError(f"{who} reads the CLS query's attention at a shallow tower layer (cls_attn_shallow), and "
                           f"{self.label}'s tower has no CLS token (no substitute is defined for that signal)")
        if Signal.CLS_FEATURE in needs:
            raise VTCError(f"{who} keeps the vision tower's CLS token, and {self.label}'s tower has none: "
                           "run it without (VisionZip: keep_cls=False)")
        if Signal.TEXT_SIM in needs and getattr(self.text_scorer, "reads", None) != "projected":
            given = "none was given" if self.text_scorer is None else f"{type(self.text_scorer).__name__} reads CLIP patch states"
            raise VTCError(f"{who} needs a text-to-patch score, and {self.label} has no CLIP text tower ({given}): "
                           "use the language-model embedding text source (--text-source llm, text_source='llm')")

    # ------------------------------------------------------------------ layout

    def grids(self, inputs) -> list[QwenGrid]:
        """The merged-token grid of each prompt's one image; video and several images per prompt refused."""
        if inputs.get("pixel_values_videos") is not None or inputs.get("video_grid_thw") is not None:
            raise VTCError(f"{self.label}: video input is not supported (images only)")
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise VTCError(f"{self.label} inputs need 'image_grid_thw' (use the model's own processor)")
        if int(thw.shape[0]) != int(inputs["input_ids"].shape[0]):
            raise VTCError(f"{self.label}: exactly one image per prompt ({thw.shape[0]} images for "
                           f"{inputs['input_ids'].shape[0]} prompts)")
        out = []
        for t, h, w in thw.tolist():
            if t != 1:
                raise VTCError(f"{self.label}: video input (t={t} frames) is not supported (images only)")
            out.append(QwenGrid((h // self.merge, w // self.merge)))
        return out

    def tokens_before(self, inputs) -> list[int]:
        return [g.num_candidates for g in self.grids(inputs)]

    def map_panels(self, selection: Selection) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        grid = selection.layout.grid
        return [("merged tokens", torch.arange(grid[0] * grid[1]), grid_boxes(grid))]

    # ------------------------------------------------------------------ signals

    def attention_layer(self, spec: AttentionSpec) -> int:
        """The tower layer the attention signals are read at (every layer of Qwen2-VL attends fully)."""
        index = spec.layer % self.num_layers if spec.layer < 0 else spec.layer
        if not 0 <= index < self.num_layers:
            raise VTCError(f"attention layer {spec.layer} does not exist in a {self.num_layers}-layer vision tower")
        return index

    def window_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merge groups in the order the tower holds them (Qwen2-VL: raster order)."""
        return torch.arange(int((grid_thw.prod(-1) // self.merge**2).sum()))

    @contextmanager
    def _capture(self, layer: int, store: dict):
        """q/k/v projections and the rotary (cos, sin) of one block, without changing its forward (SDPA kept)."""
        attn = self.tower.blocks[layer].attn

        def keep_qkv(module, args, output):
            store["qkv"] = output

        def keep_rope(module, args, kwargs):
            store["rope"] = kwargs["position_embeddings"]

        handles = [attn.qkv.register_forward_hook(keep_qkv), attn.register_forward_pre_hook(keep_rope, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def signals(self, inputs, grids: list[QwenGrid], needs: frozenset[str], attention: AttentionSpec,
                text_queries: list[str] | None = None, text: TextSpec = TextSpec()) -> list[dict[str, torch.Tensor]]:
        """One stock tower forward for the batch; per image, every declared signal over its merged tokens (raster)."""
        pixels, thw = inputs["pixel_values"], inputs["image_grid_thw"]
        if not torch.isfinite(pixels).all():
            raise VTCError("pixel_values contain NaN or inf")
        if pixels.dim() != 2 or pixels.shape[0] != int(thw.prod(-1).sum()):
            raise VTCError(f"{self.label} pixel_values must be (patches, channels) with the {int(thw.prod(-1).sum())} patches "
                           f"image_grid_thw describes; got shape {tuple(pixels.shape)} (use the model's own processor)")
        needs_attn = bool(needs & {Signal.CLS_ATTN, Signal.KEYS, Signal.RECEIVED_ATTN})
        layer = self.attention_layer(attention) if needs_attn else None
        store: dict = {}
        with self._capture(layer, store) if needs_attn else _nothing(), self._capture_features(store):
            out = self.tower(pixels.to(self.tower.dtype), grid_thw=thw)
        unit = self.merge**2
        order = self.window_order(thw)
        raster = torch.argsort(order)  # tower order -> raster order of merge groups
        groups = self.merger_groups(out, store)[raster]
        projected = out.pooler_output
        sizes = [g.num_candidates for g in grids]
        per_image: list[dict[str, torch.Tensor]] = [{} for _ in grids]
        for b, part in enumerate(groups.split(sizes)):
            per_image[b][Signal.FEATURES] = part
        for b, part in enumerate(projected.split(sizes)):
            per_image[b][Signal.PROJECTED] = part
        if needs_attn:
            self._attention_signals(store, order, raster, sizes, needs, attention, per_image)
        if Signal.TEXT_SIM in needs:
            if text_queries is None or len(text_queries) != len(grids):
                raise VTCError("text-guided methods need one question per image")
            for b, signals in enumerate(per_image):
                signals[Signal.TEXT_SIM] = self.text_scorer.similarity(signals[Signal.PROJECTED][None], [text_queries[b]], text)[0]
        return per_image

    @contextmanager
    def _capture_features(self, store: dict):
        """Tower states FEATURES need besides the last block's (Qwen2-VL: none)."""
        yield

    def merger_groups(self, out, store: dict) -> torch.Tensor:
        """(tokens, 4C) FEATURES in tower order: each merged token's 2 x 2 group of last-block states, flattened."""
        return out.last_hidden_state.reshape(-1, self.merge**2 * self.patch_width)

    def _attention_signals(self, store, order, raster, sizes, needs, attention, per_image) -> None:
        """Received attention (the CLS substitute) and keys per merged token, from the captured block."""
        modeling = importlib.import_module(self.modeling)
        qkv = store["qkv"]
        seq, unit = qkv.shape[0], self.merge**2
        q, k, _ = qkv.reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, heads, hd) each
        cos, sin = store["rope"]
        q_rot, k_rot = modeling.apply_rotary_pos_emb_vision(q, k, cos, sin)
        start = 0
        received = []
        for n in (s * unit for s in sizes):  # images are contiguous in tower order too (windows stay inside an image)
            rows = slice(start, start + n)
            received.append(received_attention(q_rot[rows].flatten(1)[None], k_rot[rows].flatten(1)[None],
                                               self.num_heads, attention.heads, prefix=0,
                                               exclude_self=attention.received == "others")[0])
            start += n
        token_received = torch.cat(received).view(-1, unit).sum(1)[raster]
        keys = k.reshape(-1, unit, k.shape[1], k.shape[2]).mean(1)[raster]  # (tokens, heads, hd), raw (no rotary)
        keys = keys.mean(1) if attention.keys == "head_mean" else keys.flatten(1)
        for b, (r, key) in enumerate(zip(token_received.split(sizes), keys.split(sizes))):
            if Signal.CLS_ATTN in needs:
                per_image[b][Signal.CLS_ATTN] = r
            if Signal.RECEIVED_ATTN in needs:
                per_image[b][Signal.RECEIVED_ATTN] = r
            if Signal.KEYS in needs:
                per_image[b][Signal.KEYS] = key

    # ------------------------------------------------------------------ compress

    def compress(
        self, inputs, method: Method, budget: Budget, text_queries: list[str] | None, per_tile: bool = False
    ) -> tuple[list[Selection], dict[str, float]]:
        """Signals for the batch in one tower forward; images with the same grid selected in one call."""
        self.refuse_unsupported(method)
        self.refuse_missing(method.needs, f"'{method.name}'")
        grids = self.grids(inputs)
        budget = Budget.parse(budget)
        per_image, signals_ms = timed(self.signals, inputs, grids, method.needs, method.attention, text_queries, method.text)
        selections, select_ms = timed(self._select, per_image, grids, method, budget)
        for selection, grid in zip(selections, grids):
            selection.layout = grid
            if Signal.CLS_ATTN in method.needs:
                selection.info = {**selection.info, "cls_attn": "received_attn",
                                  "attn_layer": self.attention_layer(method.attention)}
        return selections, {"signals_ms": signals_ms, "select_ms": select_ms}

    def _select(self, per_image, grids, method: Method, budget: Budget) -> list[Selection]:
        selections: list[Selection | None] = [None] * len(grids)
        groups: dict[tuple[int, int], list[int]] = {}
        for b, g in enumerate(grids):
            groups.setdefault(g.grid, []).append(b)
        wanted = [name for name in Signal.PER_PATCH if name in method.needs or name == Signal.FEATURES]
        for grid, members in groups.items():
            stacked = {name: torch.stack([per_image[b][name] for b in members]) for name in wanted if name in per_image[members[0]]}
            signals = Signals(grid=grid, **stacked)
            for b, selection in zip(members, method.select(signals, budget)):
                selections[b] = selection
        return selections

    # ------------------------------------------------------------------ splice

    @staticmethod
    def prompt_order(selection: Selection) -> torch.Tensor:
        """Output tokens in the order they are sent: single-source tokens by position, then the others as output."""
        single = (selection.origin == Origin.KEPT) | (selection.origin == Origin.RECOVERED)
        starts = selection.source_sizes.cumsum(0) - selection.source_sizes
        kept = single.nonzero().squeeze(1)
        kept = kept[selection.source_index[starts[kept]].argsort(stable=True)]
        return torch.cat([kept, (~single).nonzero().squeeze(1)])

    @torch.no_grad()
    def project(self, selections: list[Selection]) -> list[torch.Tensor]:
        """The stock merger on each sent token's 2 x 2 group (per-patch norm, then MLP: row-wise, so exact when kept)."""
        return [self.send(s.tokens[self.prompt_order(s)]) for s in selections]

    def send(self, tokens: torch.Tensor) -> torch.Tensor:
        """(K, 4C) FEATURES rows -> (K, D) language-model tokens: the stock merger."""
        return self.merger(tokens.reshape(-1, self.patch_width))

    def token_positions(self, selection: Selection, image_positions: torch.Tensor) -> torch.Tensor:
        """(3, K) M-RoPE position of each sent token: a source's own, or the rounded mean of several sources'."""
        sources = selection.sources
        columns = []
        for i in self.prompt_order(selection).tolist():
            chosen = image_positions[:, sources[i]]
            columns.append(chosen[:, 0] if chosen.shape[1] == 1 else chosen.double().mean(1).round().long())
        return torch.stack(columns, 1) if columns else image_positions[:, :0]

    def generation_inputs(self, inputs, selections: list[Selection], input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> dict:
        """The pruned prompt's (4, B, L') position_ids (text row, then t, h, w), from the full prompt's stock positions.

        Also sets ``rope_deltas`` on the model as the stock prefill would for these positions."""
        full_ids, full_mask = inputs["input_ids"], inputs["attention_mask"]
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (full_ids == self.image_token_id).int()
        full, _ = self.model.model.get_rope_index(full_ids, types, image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=full_mask)
        batch, width = input_ids.shape
        positions = torch.zeros(3, batch, width, dtype=torch.long, device=input_ids.device)
        deltas = []
        for b, selection in enumerate(selections):
            real = full_mask[b].bool()
            ids, rows = full_ids[b][real], full[:, b][:, real]
            image = (ids == self.image_token_id).nonzero().squeeze(1)
            start, end = int(image[0]), int(image[-1]) + 1
            pieces = [rows[:, :start], self.token_positions(selection, rows[:, start:end]), rows[:, end:]]
            row = torch.cat(pieces, 1)
            if row.shape[1] != int(attention_mask[b].sum()):
                raise VTCError(f"sample {b}: {row.shape[1]} positions for a prompt of {int(attention_mask[b].sum())} tokens")
            positions[:, b, width - row.shape[1]:] = row
            deltas.append(int(row.max()) + 1 - row.shape[1])
        text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.model.model.rope_deltas = torch.tensor(deltas, device=input_ids.device)[:, None]
        return {"position_ids": torch.cat([text[None], positions])}


@register_family
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: window attention in the tower except ``fullatt_block_indexes``, where signals are read."""

    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    label = "Qwen2.5-VL"
    modeling = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"

    def attention_layer(self, spec: AttentionSpec) -> int:
        """The last full-attention layer at or before the method's layer (the first one if none is before)."""
        index = super().attention_layer(spec)
        full = sorted(self.tower.fullatt_block_indexes)
        before = [i for i in full if i <= index]
        return before[-1] if before else full[0]

    def window_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=self.merge, window_size=self.tower.window_size,
                                           patch_size=self.tower.patch_size)
        return index


@contextmanager
def _nothing():
    yield
