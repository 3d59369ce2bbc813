"""LLaVA-OneVision glue (``LlavaOnevisionForConditionalGeneration``): SigLIP tiles, Qwen2 decoder.

OneVision packs an image as LLaVA-NeXT does (a base crop, a canvas of tiles from
``image_grid_pinpoints``, unpadding, one ``image_newline`` after each canvas row), so this adapter is
``LlavaNextAdapter`` with the differences below; every decision of llava_next.py's docstring holds here
(candidates = base patches then the unpadded canvas in raster order, ``global`` scope by default and
``per_tile=True`` splitting a count by largest remainders, spatial methods per tile, newline rows follow
their row, ``downsample`` refused). The layout comes from OneVision's own transformers functions.

- **SigLIP tower, no CLS token.** Features are ``hidden_states[vision_feature_layer]`` of every token
  (``vision_feature_select_strategy="full"``; the checkpoints already drop SigLIP's last layer, so -1
  is the last layer kept); no post-layernorm, no pooling head. The tower runs once on every crop,
  only as deep as needed, SDPA kept, q/k hooked at the one layer a method reads: LLaVA-1.5's code with
  ``prefix = 0`` (no non-patch token before the patches) and no pre-layernorm.
- **CLS attention substitute.** A method that reads ``cls_attn`` gets the attention each patch receives
  averaged over all patch queries of its crop (``received_attn``, computed in chunks of query rows at
  the method's ``attention.layer`` with its ``heads`` form), computed once as a signal; each Selection's
  ``info`` says ``"cls_attn": "received_attn"``. It is the issue's suggested substitute and FoPru's own
  score (``fopru-*`` read it directly); it is a distribution over the patches, as the CLS row nearly
  is (the row also gives some mass to CLS itself), so rules that rank or threshold it still apply.
  Layer indices are the tower's own: -1 is the last layer the checkpoint keeps (OneVision's feature
  layer), so a method's default -2 reads the one before, not the feature layer as on LLaVA-1.5.
- **CLS feature refused.** VisionZip keeps the CLS token's state as an extra token (``keep_cls=True``,
  its default). SigLIP has none, and the nearest thing, its attention-pooling head, is not in the
  checkpoints; inventing one (a mean of patches) would feed the language model a token it never saw,
  so it is refused with a message naming ``keep_cls=False``.
- **Shrunk canvases: the shrunk cells are the candidates.** ``anyres_max_N`` lets the unpadded canvas
  hold about N tiles' worth of patches; over 1.1 x that scale the stock model shrinks the *projected*
  canvas bilinearly (``pack_image_features``), so each of its tokens blends four patches, made after
  the non-linear projector. With the released pinpoints (384 px tiles) 640x480, 1024x768 and
  1152x1152 are not shrunk; 1280x960, 1920x1080 and 1200x1200 are. For such an image the candidates
  are the base patches then the shrunk cells (what the model sends, newlines aside): every per-patch
  signal (features, attention, keys, text score) is interpolated on the unpadded canvas exactly as
  the model interpolates its canvas, and each cell's stock token (projected, then interpolated) is
  kept: a kept cell is sent as that stock token, so ``none`` equals stock ``generate`` and pruning
  equals masking on every image; a merged token is the projection of the merged (interpolated)
  features, as for every other merge. Per-tile budgets give each cell to the tile of the unpadded
  cell nearest its centre. The alternative, refusing such images, would turn away most photos over a
  megapixel.
- **Text guidance.** The CLIP text scorer reads CLIP patch states and does not apply to SigLIP; a
  text-guided method needs a scorer that reads the projected tokens (``reads == "projected"``, the
  language-model embedding source: ``Pipeline.from_pretrained(path, text_source="llm")``, CLI
  ``--text-source llm``) and is refused without one, naming what is missing.
- **Processor.** ``AutoProcessor`` builds the video processor too, which needs torchvision; ``load``
  builds ``ImageOnlyOnevisionProcessor`` (the stock processor without its video part) from the
  checkpoint's image processor (PIL backend), tokenizer, processor config and chat template.
- **One image per prompt.** A prompt with several images (``batch_num_images`` > 1, which OneVision
  feeds untiled) is refused.
- **In-LLM methods** hook the Qwen2 decoder layers as they hook Llama's (same rotary and q/k layout;
  Qwen2's q/k biases are inside ``q_proj``/``k_proj``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaOnevisionProcessor

from ..methods.base import Budget, Method, Origin, Selection, Signal, Signals, VTCError
from .family import register_family
from .llava import check_supported
from .llava_next import LlavaNextAdapter, TileLayout


@dataclass
class ShrunkLayout(TileLayout):
    """A tile canvas the stock model shrinks bilinearly (after the projector) to ``canvas.shape``.

    ``canvas`` numbers the shrunk cells after the image's crop tokens (crops * P + cell): they are the
    candidates; ``source``: the unpadded canvas of crop-token indices they are interpolated from;
    ``stock``: (cells, D_llm) the stock model's token of every cell, set when the features are known.
    """

    source: torch.Tensor | None = None
    stock: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Rows of this image in the flattened candidate signals: its crop tokens, then its cells."""
        return self.crops * self.patches + self.canvas.numel()

    def shrink(self, values: torch.Tensor) -> torch.Tensor:
        """(H*W, ...) values on the unpadded canvas -> (h*w, ...), as pack_image_features shrinks its canvas."""
        height, width = self.source.shape
        grid = values.reshape(height, width, -1).permute(2, 0, 1)[None]
        small = torch.nn.functional.interpolate(grid, list(self.canvas.shape), mode="bilinear")[0]
        return small.permute(1, 2, 0).reshape(self.canvas.numel(), *values.shape[1:])

    def crop_of(self) -> torch.Tensor:
        """The crop of the unpadded cell nearest each shrunk cell's centre (for per-tile budgets)."""
        (h, w), (height, width) = self.canvas.shape, self.source.shape
        ys = ((torch.arange(h) + 0.5) * height / h).long().clamp(max=height - 1)
        xs = ((torch.arange(w) + 0.5) * width / w).long().clamp(max=width - 1)
        return self.source[ys][:, xs] // self.patches


class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without the video processor (which needs torchvision); saves as the stock one."""

    def __init__(
        self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
        chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs,
    ):
        # ProcessorMixin pairs positional sub-processors with this class's attributes (no video_processor): the None is dropped.
        super().__init__(
            image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
            image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs,
        )

    def to_dict(self):
        return {**super().to_dict(), "processor_class": "LlavaOnevisionProcessor"}


@register_family
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Signals from, and token splicing into, a stock HF LLaVA-OneVision model (see the module docstring)."""

    name = "llava-onevision"
    tower_gap = "a SigLIP tower without a CLS token, and crops whose padded cells are cut after the tower"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    modeling = "transformers.models.llava_onevision.modeling_llava_onevision"
    label = "LLaVA-OneVision"
    prefix = 0  # SigLIP puts no CLS token before the patches

    def __init__(self, model, text_scorer=None):
        super().__init__(model, text_scorer)
        self.max_tiles = max_tiles(model.config.vision_aspect_ratio)

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype, device: torch.device):
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        processor_dict, _ = ImageOnlyOnevisionProcessor.get_processor_dict(path)
        parts = [AutoImageProcessor.from_pretrained(path, backend="pil"), AutoTokenizer.from_pretrained(path)]
        return model, ImageOnlyOnevisionProcessor.from_args_and_dict(parts, processor_dict)

    def check_supported(self, model) -> None:
        check_supported(model, self.model_class, self.label, tower_class="SiglipVisionModel", strategy="full")
        max_tiles(model.config.vision_aspect_ratio)

    def embed(self, pixel_values: torch.Tensor, resized: bool) -> torch.Tensor:
        """SigLIP's embeddings are the first layer's input (no pre-layernorm)."""
        return self.tower.embeddings(pixel_values, interpolate_pos_encoding=resized)

    # ------------------------------------------------------------------ layout

    def layout(self, image_size) -> TileLayout:
        """As LLaVA-NeXT; a canvas the stock model shrinks becomes a ``ShrunkLayout`` of its shrunk cells."""
        layout = super().layout(image_size)
        height, width = layout.canvas.shape
        # pack_image_features' own test and target size, in its own terms
        ratio = math.sqrt(height * width / (self.max_tiles * self.grid[0] ** 2))
        if ratio <= 1.1:
            return layout
        size = (int(height // ratio), int(width // ratio))
        cells = layout.crops * layout.patches + torch.arange(size[0] * size[1]).view(size)
        return ShrunkLayout(layout.crops, layout.tiles, cells, layout.patches, layout.side, source=layout.canvas)

    def layouts(self, inputs) -> list[TileLayout]:
        counts = inputs.get("batch_num_images")
        if counts is not None and any(int(n) != 1 for n in counts):
            raise VTCError("LLaVA-OneVision: exactly one image per prompt (several images are fed untiled, not served)")
        return super().layouts(inputs)

    # ------------------------------------------------------------------ shrunk canvases

    @torch.no_grad()
    def candidate_signals(self, inputs, layouts, method, queries):
        """Crop signals, with each shrunk canvas's cells appended after its image's crop tokens: every per-patch
        signal interpolated as the stock model interpolates its projected canvas, and the stock tokens kept."""
        crops, first = super().candidate_signals(inputs, layouts, method, queries)
        if not any(isinstance(layout, ShrunkLayout) for layout in layouts):
            return crops, first
        names = [name for name in Signal.PER_PATCH if getattr(crops, name) is not None]
        flat = {name: getattr(crops, name).flatten(0, 1) for name in names}
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        offsets, start, row = [], 0, 0
        for layout in layouts:
            own = {name: flat[name][start : start + layout.crops * self.num_patches] for name in names}
            start += layout.crops * self.num_patches
            offsets.append(row)
            row += layout.rows if isinstance(layout, ShrunkLayout) else layout.crops * self.num_patches
            for name in names:
                pieces[name].append(own[name])
            if isinstance(layout, ShrunkLayout):
                for name, cells in self.shrunk_signals(layout, own).items():
                    pieces[name].append(cells)
        out = Signals(grid=(1, row), **{name: torch.cat(pieces[name])[None] for name in names})
        out._finite = set(crops._finite)  # interpolating finite values keeps them finite
        return out, offsets

    def shrunk_signals(self, layout: ShrunkLayout, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every signal of one image's shrunk cells, from its crop tokens' (``own``); sets ``layout.stock``."""
        source = layout.source.flatten()
        if Signal.PROJECTED in own:
            projected = own[Signal.PROJECTED][source]
        else:  # the projector on the canvas, as the stock model runs it before shrinking
            projected = self.projector(own[Signal.FEATURES][source])
        layout.stock = layout.shrink(projected)
        return {
            name: layout.stock if name == Signal.PROJECTED else layout.shrink(values[source]) for name, values in own.items()
        }

    def arrange(self, selection: Selection, tokens: torch.Tensor) -> torch.Tensor:
        """A kept cell of a shrunk canvas is the stock model's own token (interpolated after the projector)."""
        layout = selection.layout
        if isinstance(layout, ShrunkLayout):
            single = ((selection.origin == Origin.KEPT) | (selection.origin == Origin.RECOVERED)).nonzero().squeeze(1)
            position = selection.kept_indices()
            cell = position >= layout.patches
            tokens = tokens.clone()
            tokens[single[cell]] = layout.stock[position[cell] - layout.patches].to(tokens)
        return super().arrange(selection, tokens)

    # ------------------------------------------------------------------ signals

    def signals(self, pixel_values, needs, attention, text_queries=None, grid=None, text=None):
        """SigLIP signals: ``cls_attn`` is the received attention (module docstring); a CLS feature is refused."""
        self.refuse_missing(needs)
        asked = needs
        if Signal.CLS_ATTN in needs:
            needs = (needs - {Signal.CLS_ATTN}) | {Signal.RECEIVED_ATTN}
        kwargs = {} if text is None else {"text": text}
        out = super().signals(pixel_values, frozenset(needs), attention, text_queries, grid=grid, **kwargs)
        if Signal.CLS_ATTN in asked:
            out.cls_attn = out.received_attn
            out.received_attn = out.received_attn if Signal.RECEIVED_ATTN in asked else None
        return out

    @classmethod
    def support(cls, method: Method) -> tuple[bool, str]:
        served, how = super().support(method)
        if not served or getattr(method, "in_llm", False):
            return served, how
        if Signal.CLS_FEATURE in method.needs:
            return False, "it keeps the CLS token and SigLIP has none (VisionZip: keep_cls=False)"
        if Signal.CLS_ATTN_SHALLOW in method.needs:
            return False, "it reads the CLS query's attention at a shallow layer and SigLIP has no CLS token"
        if Signal.CLS_ATTN in method.needs:
            how += ", CLS attention = received attention"
        if Signal.TEXT_SIM in method.needs:
            how += ", needs the LLM-embedding text source"
        return served, how

    def refuse_missing(self, needs: frozenset[str], who: str = "this method") -> None:
        """Refuse the signals SigLIP cannot give: a CLS token's state, a text score without a fitting scorer."""
        if Signal.CLS_FEATURE in needs:
            raise VTCError(
                f"{who} keeps the vision tower's CLS token, and LLaVA-OneVision's SigLIP tower has none: "
                "run it without (VisionZip: keep_cls=False)"
            )
        if Signal.CLS_ATTN_SHALLOW in needs:
            raise VTCError(
                f"{who} reads the CLS query's attention at a shallow tower layer (cls_attn_shallow), and "
                "LLaVA-OneVision's SigLIP tower has no CLS token (no substitute is defined for that signal)"
            )
        if Signal.TEXT_SIM in needs and self.text_scorer is None:
            raise VTCError(
                f"{who} needs a text-to-patch score, and LLaVA-OneVision has no CLIP text tower to give one: "
                "it needs the language-model embedding text source (a scorer reading the projected tokens)"
            )
        if Signal.TEXT_SIM in needs and getattr(self.text_scorer, "reads", "final") != "projected":
            raise VTCError(
                f"{who} needs a text score, and the scorer given ({type(self.text_scorer).__name__}) reads CLIP patch "
                "states, not LLaVA-OneVision's SigLIP ones: it needs the language-model embedding text source "
                "(a scorer reading the projected tokens)"
            )

    def compress(
        self, inputs, method: Method, budget: Budget, text_queries: list[str] | None, per_tile: bool = False
    ) -> tuple[list[Selection], dict[str, float]]:
        self.refuse_missing(method.needs, f"'{method.name}'")
        selections, timings = super().compress(inputs, method, budget, text_queries, per_tile=per_tile)
        if Signal.CLS_ATTN in method.needs:
            for selection in selections:
                selection.info = {**selection.info, "cls_attn": "received_attn"}
        return selections, timings


def max_tiles(vision_aspect_ratio: str) -> int:
    """N of ``anyres_max_N``, the only aspect-ratio mode the stock model packs images with."""
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None:
        raise VTCError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported; LLaVA-OneVision needs 'anyres_max_N'")
    return int(match.group(1))
