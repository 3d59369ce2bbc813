"""LLaVA-NeXT glue (``LlavaNextForConditionalGeneration``, llava-v1.6 checkpoints): any-resolution tiles.

An image reaches the model as several crops of the CLIP tower's size: a base crop (the whole
image, resized) and tiles of a canvas chosen from ``image_grid_pinpoints``. The model keeps
every patch of the base crop, unpads the tile canvas (the rows or columns that only show the
processor's padding go) and appends ``image_newline`` after each canvas row. Here:

- **Candidates.** The N patch tokens a method chooses from are the base crop's patches (raster
  order) then the unpadded canvas (raster order over the whole canvas), exactly the tokens the
  stock model would send, newlines aside. Which canvas cells survive unpadding is computed by
  running transformers' own ``unpad_image`` on a canvas of token indices, so it cannot drift
  from the model's.
- **Signals.** The CLIP tower runs once on every crop of the batch (SDPA, q/k hooks; the
  LLaVA-1.5 code path). Each patch's CLS attention, keys and text score come from its own crop;
  the CLS feature of an image (VisionZip's kept CLS) is the base crop's.
- **Budgets.** By default a count or ratio applies to the whole image: the method ranks all N
  candidates together (``scope: global``). ``per_tile=True`` runs it on the base crop and on each
  tile's unpadded rectangle separately: a ratio applies to each, a count is split in proportion
  to their tokens (largest remainders, so the parts sum to the count), ``auto`` is each part's
  own rule. Methods whose rule is spatial (``Method.spatial``: pooling regions of a grid) always
  run per tile. ``downsample`` shrinks a single-grid input and is refused here.
- **Newline rows follow their row.** The language model gets the kept base tokens, then the kept
  canvas tokens in canvas raster order with one ``image_newline`` after every canvas row that
  kept at least one token, then the method's merged and global tokens in the method's order. The
  newlines are not counted in the budget (it counts patch tokens); ``tokens_after`` counts what the
  language model sees, newlines included. With every token kept the sequence is the stock one.
  Always keeping all newlines (FasterVLM's LLaVA-NeXT code) would spend 48 of a 10% budget of 288
  tokens on a 672x672 image on layout; dropping all would merge rows the model was trained to see
  apart.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..methods.base import Budget, Method, Origin, Selection, Signal, Signals, VTCError
from .family import register_family, timed
from .llava import LlavaAdapter, check_supported, grid_boxes



@dataclass
class TileLayout:
    """Where one image's candidate tokens come from and where they go.

    ``crops``: base + tiles; ``tiles``: (rows, columns) of the tile canvas; ``canvas``: (H', W') the
    crop-token index (crop * P + patch) of every cell of the unpadded canvas; ``patches``: P per crop.
    """

    crops: int
    tiles: tuple[int, int]
    canvas: torch.Tensor
    patches: int
    side: int

    @property
    def num_candidates(self) -> int:
        return self.patches + self.canvas.numel()

    @property
    def num_tokens(self) -> int:
        """Image tokens of the stock prompt: base patches, canvas, one newline per canvas row."""
        h, w = self.canvas.shape
        return self.patches + h * (w + 1)

    def candidates(self) -> torch.Tensor:
        """(N,) crop-token index of every candidate, in candidate order."""
        return torch.cat([torch.arange(self.patches), self.canvas.flatten()])

    def crop_of(self) -> torch.Tensor:
        """(H', W') the crop (1.. for tiles) each canvas cell comes from."""
        return self.canvas // self.patches

    def segments(self) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """The base crop and each tile's unpadded rectangle: (candidate positions in raster order, grid)."""
        parts = [(torch.arange(self.patches), (self.side, self.side))]
        crop_of = self.crop_of()
        for tile in range(1, self.crops):
            inside = crop_of == tile
            if not inside.any():
                continue
            grid = (int(inside.any(1).sum()), int(inside.any(0).sum()))
            parts.append((self.patches + inside.flatten().nonzero().squeeze(1), grid))
        return parts


@register_family
class LlavaNextAdapter(LlavaAdapter):
    """Signals from, and token splicing into, a stock HF LLaVA-NeXT model (see the module docstring)."""

    name = "llava-next"
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"
    tiled = True
    tower_hook = False  # not wired: each crop's padded cells would have to be followed through the tower's merges
    # The transformers module whose own tiling functions (grid shape, crop count, unpad_image) lay images out.
    modeling = "transformers.models.llava_next.modeling_llava_next"
    label = "LLaVA-NeXT"  # the family as messages name it

    def __init__(self, model, text_scorer=None):
        super().__init__(model, text_scorer)
        self.image_newline = model.model.image_newline
        self.pinpoints = model.config.image_grid_pinpoints
        self.tile_size = self.tower.config.image_size

    def check_supported(self, model) -> None:
        check_supported(model, self.model_class, self.label)

    @classmethod
    def support(cls, method: Method) -> tuple[bool, str]:
        if getattr(method, "in_llm", False):
            return True, "in the LLM"
        if getattr(method, "in_tower", False):  # crops whose tile padding and unpadding would follow the merges
            return cls.tower_support()
        if type(method).input_grid is not Method.input_grid:
            return False, "it runs the vision tower on a smaller single grid; the tiles are not supported (use 'pool')"
        return True, "per tile" if method.spatial else "global or per tile"

    # ------------------------------------------------------------------ layout

    def layout(self, image_size) -> TileLayout:
        """The tile layout of an image of ``image_size`` (height, width), as the stock model packs it."""
        modeling = importlib.import_module(self.modeling)
        size = [int(v) for v in image_size]
        crops = modeling.image_size_to_num_patches(size, self.pinpoints, self.tile_size)
        rows, cols = modeling.get_anyres_image_grid_shape(size, self.pinpoints, self.tile_size)
        side, p = self.grid[0], self.num_patches
        if rows * cols != crops - 1:
            raise VTCError(f"image of size {size}: {crops - 1} tiles do not fill a {rows}x{cols} canvas")
        index = p + torch.arange((crops - 1) * p).view(rows, cols, side, side)
        canvas = index.permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
        canvas = modeling.unpad_image(canvas, size)[0]
        return TileLayout(crops, (rows, cols), canvas.contiguous(), p, side)

    def layouts(self, inputs) -> list[TileLayout]:
        if "image_sizes" not in inputs:
            raise VTCError(f"{self.label} inputs need 'image_sizes' (use the model's own processor)")
        return [self.layout(size) for size in inputs["image_sizes"].tolist()]

    def tokens_before(self, inputs) -> list[int]:
        return [layout.num_tokens for layout in self.layouts(inputs)]

    def crop_pixels(self, inputs, layouts: list[TileLayout]) -> torch.Tensor:
        """Every real crop of the batch, image after image: (sum of crops, 3, S, S)."""
        pixels = inputs["pixel_values"]
        if pixels.dim() != 5:
            raise VTCError(f"{self.label} pixel_values must be (B, crops, 3, H, W), got shape {tuple(pixels.shape)}")
        for b, layout in enumerate(layouts):
            if pixels.shape[1] < layout.crops:
                raise VTCError(f"image {b} needs {layout.crops} crops but pixel_values holds {pixels.shape[1]}")
        return torch.cat([pixels[b, : layout.crops] for b, layout in enumerate(layouts)])

    # ------------------------------------------------------------------ compress

    def compress(
        self, inputs, method: Method, budget: Budget, text_queries: list[str] | None, per_tile: bool = False
    ) -> tuple[list[Selection], dict[str, float]]:
        self.refuse_unsupported(method)
        layouts = self.layouts(inputs)
        budget = Budget.parse(budget)
        crops = [layout.crops for layout in layouts]
        queries = None if text_queries is None else [q for q, c in zip(text_queries, crops) for _ in range(c)]
        if text_queries is not None and len(text_queries) != len(layouts):
            raise VTCError("text-guided methods need one question per image")
        (crop_signals, first), signals_ms = timed(self.candidate_signals, inputs, layouts, method, queries)
        scope = "per_tile" if per_tile or method.spatial else "global"
        select = self._select_per_tile if scope == "per_tile" else self._select_global
        selections, select_ms = timed(select, crop_signals, layouts, first, method, budget)
        for selection, layout in zip(selections, layouts):
            selection.layout = layout
            selection.info = {**selection.info, "scope": scope, "tiles": list(layout.tiles)}
        return selections, {"signals_ms": signals_ms, "select_ms": select_ms}

    def candidate_signals(self, inputs, layouts: list[TileLayout], method: Method, queries) -> tuple[Signals, list[int]]:
        """Signals of every crop of the batch (crops, P, ...), and where each image's crop tokens start once flattened."""
        crops = [layout.crops for layout in layouts]
        signals = self.signals(
            self.crop_pixels(inputs, layouts), method.needs, method.attention, queries, text=method.text
        )
        return signals, [sum(crops[:b]) * self.num_patches for b in range(len(layouts))]

    def _gather(self, crop: Signals, index: torch.Tensor, grid: tuple[int, int], cls_rows: torch.Tensor) -> Signals:
        """Signals of G token sets: ``index`` (G, n) crop-token indices, ``cls_rows`` (G,) the crop whose CLS each uses."""
        g, n = index.shape

        def take(t):
            if t is None:
                return None
            flat = t.reshape(-1, *t.shape[2:])
            return flat.index_select(0, index.flatten()).view(g, n, *t.shape[2:])

        out = Signals(
            features=take(crop.features), grid=grid,
            **{name: take(getattr(crop, name)) for name in Signal.PER_PATCH if name != Signal.FEATURES},
            cls_feature=None if crop.cls_feature is None else crop.cls_feature.index_select(0, cls_rows),
        )
        out._finite = set(crop._finite)
        return out

    def _select_global(self, crop, layouts, first, method, budget) -> list[Selection]:
        """All N candidates of an image ranked together; images with equal N share one call."""
        selections: list[Selection | None] = [None] * len(layouts)
        groups: dict[int, list[int]] = {}
        for b, layout in enumerate(layouts):
            groups.setdefault(layout.num_candidates, []).append(b)
        for n, members in groups.items():
            index = torch.stack([layouts[b].candidates() + first[b] for b in members])
            base_crops = torch.tensor([first[b] // self.num_patches for b in members])
            for b, selection in zip(members, method.select(self._gather(crop, index, (1, n), base_crops), budget)):
                selections[b] = selection
        return selections

    def _select_per_tile(self, crop, layouts, first, method, budget) -> list[Selection]:
        """The base crop and every tile on their own, with the budget split as the module docstring says."""
        parts = []  # (image, candidate positions, grid, budget of the part)
        for b, layout in enumerate(layouts):
            segments = layout.segments()
            for (positions, grid), part_budget in zip(segments, split_budget(budget, [len(p) for p, _ in segments])):
                if part_budget is not None:
                    parts.append((b, positions, grid, part_budget))
        groups: dict[tuple, list[int]] = {}
        for i, (_, positions, grid, part_budget) in enumerate(parts):
            groups.setdefault((grid, str(part_budget)), []).append(i)
        results: dict[int, Selection] = {}
        candidates = [layout.candidates() for layout in layouts]
        for (grid, _), members in groups.items():
            index = torch.stack([candidates[parts[i][0]][parts[i][1]] + first[parts[i][0]] for i in members])
            crops = (index[:, 0] // self.num_patches).long()
            chosen = method.select(self._gather(crop, index, grid, crops), parts[members[0]][3])
            results.update(zip(members, chosen))
        return [
            combine_selections(
                [(results[i], parts[i][1]) for i in range(len(parts)) if parts[i][0] == b], layout.num_candidates
            )
            for b, layout in enumerate(layouts)
        ]

    # ------------------------------------------------------------------ project

    @torch.no_grad()
    def project(self, selections: list[Selection]) -> list[torch.Tensor]:
        """Projected tokens in LLaVA-NeXT's order: base, canvas rows each closed by a newline, then merged/global."""
        projected = super().project(selections)
        return [self.arrange(s, tokens) for s, tokens in zip(selections, projected)]

    def arrange(self, selection: Selection, tokens: torch.Tensor) -> torch.Tensor:
        layout: TileLayout = selection.layout
        single = (selection.origin == Origin.KEPT) | (selection.origin == Origin.RECOVERED)
        starts = selection.source_sizes.cumsum(0) - selection.source_sizes
        position = torch.full((selection.num_tokens,), -1, dtype=torch.long)
        position[single] = selection.source_index[starts[single]]
        kept = single.nonzero().squeeze(1)
        kept = kept[position[kept].argsort(stable=True)]
        base = kept[position[kept] < layout.patches]
        canvas = kept[position[kept] >= layout.patches]
        row = (position[canvas] - layout.patches) // layout.canvas.shape[1]
        newline = self.image_newline.to(tokens)[None]
        pieces = [tokens[base]]
        rows = row.unique_consecutive().tolist()
        for r in rows:
            pieces += [tokens[canvas[row == r]], newline]
        pieces.append(tokens[(~single).nonzero().squeeze(1)])
        selection.info = {**selection.info, "newline_tokens": len(rows)}
        return torch.cat(pieces)

    def map_panels(self, selection: Selection) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The base crop over the whole picture, and the tile canvas at its place (the unpadded canvas is the picture)."""
        layout: TileLayout = selection.layout
        p, canvas = layout.patches, tuple(layout.canvas.shape)
        rows, cols = layout.tiles
        return [("base", torch.arange(p), grid_boxes(self.grid)),
                (f"tiles {rows}x{cols}", p + torch.arange(layout.canvas.numel()), grid_boxes(canvas))]


def split_budget(budget: Budget, sizes: list[int]) -> list[Budget | None]:
    """A budget per part (None: the part keeps nothing). Ratios and 'auto' apply to each part; a count is split
    in proportion to the parts' sizes by largest remainders (ties to the earlier part), so the parts sum to it."""
    if budget.kind != "count":
        return [budget] * len(sizes)
    total = sum(sizes)
    count = budget.tokens(total)
    exact = [count * s / total for s in sizes]
    shares = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: count - sum(shares)]:
        shares[i] += 1
    return [Budget.parse(s) if s > 0 else None for s in shares]


def combine_selections(parts: list[tuple[Selection, torch.Tensor]], num_candidates: int) -> Selection:
    """One image's Selection from the Selections of its parts; ``positions`` maps each part's patches to the image's."""
    tokens, origin, index, sizes = [], [], [], []
    owner = torch.full((num_candidates,), -1, dtype=torch.long)
    offset = 0
    for selection, positions in parts:
        tokens.append(selection.tokens)
        origin.append(selection.origin)
        index.append(positions[selection.source_index])
        sizes.append(selection.source_sizes)
        owned = selection.owner >= 0
        owner[positions[owned]] = selection.owner[owned] + offset
        offset += selection.num_tokens
    infos = [s.info for s, _ in parts if s.info]
    return Selection(
        torch.cat(tokens), torch.cat(origin), owner=owner, info={"parts": infos} if infos else None,
        source_index=torch.cat(index), source_sizes=torch.cat(sizes),
    )
