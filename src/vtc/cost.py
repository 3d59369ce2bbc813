"""Analytical cost model: FLOPs of the vision tower, projector and LLM prefill/decode, and KV-cache bytes.

Conventions (those of FastV and of the Recoverable Compression paper, whose 8.5T FLOPs
for LLaVA-1.5-7B at 576 image tokens this reproduces): FLOPs = 2 x multiply-adds;
attention scores and weighted sums count the full n x n (no causal halving); Llama's
gated MLP counts its three matrices; norms, softmax, RoPE and biases are ignored (< 1%).
The LM head runs on the last position only (``generate`` keeps one logit row).

Tiled families (LLaVA-NeXT, LLaVA-OneVision): the vision tower runs once per crop (base + tiles);
the projector runs on the patch tokens; the language model also sees one newline token per row
of the tile canvas (``Shape.canvas``), which the projector does not make.

Native-resolution towers (Qwen2-VL, Qwen2.5-VL; ``Shape.patch_grid``): the tower runs once on the
image's own patch grid; ``merge`` x ``merge`` patches make one language-model token (the candidates
a method ranks). Qwen2.5-VL's window layers attend inside windows of ``window`` x ``window`` patches
laid from the top-left corner of the merged grid (edge windows are smaller, as
``get_vision_window_index`` cuts them), its ``full_attention_layers`` over the whole image; its MLP
is gated (three matrices). The patch embedding is a 2-frame 3-D convolution (an image is repeated
to ``temporal_patch`` frames). The merger (the projector: norm, Linear 4C -> 4C, GELU, Linear
4C -> D) is charged on the tokens sent to the LLM, as LLaVA's projector.
"""

from __future__ import annotations

from dataclasses import dataclass

from .methods.base import VTCError


def is_native(config) -> bool:
    """True for a native-resolution family's config (Qwen2-VL, Qwen2.5-VL: an image is its own patch grid, merged)."""
    return getattr(config.vision_config, "spatial_merge_size", None) is not None


@dataclass(frozen=True)
class Shape:
    """The dimensions the cost model needs, read from a LLaVA config."""

    vision_width: int
    vision_mlp: int
    vision_layers: int
    patch_size: int
    image_size: int
    llm_width: int
    llm_mlp: int
    llm_layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_heads: int = 16  # CLIP ViT-L's; sets the width of head-averaged keys (vision_width // vision_heads)
    cls_tokens: int = 1  # CLIP's CLS; SigLIP (LLaVA-OneVision) has none
    crops: int = 1  # vision-tower forwards per image: 1, or base + tiles
    canvas: tuple[int, int] = (0, 0)  # (rows, columns) of the unpadded tile canvas, in patches; rows = newline tokens
    # native-resolution towers (Qwen-VL): the image's own patch grid (rows, columns); (0, 0): square crops of image_size
    patch_grid: tuple[int, int] = (0, 0)
    merge: int = 1  # patches merged into one LLM token along each side (Qwen-VL: 2, a 2 x 2 group per token)
    window: int = 0  # side of the window-attention windows, in patches (Qwen2.5-VL: 112 px / 14 = 8); 0: none
    full_attention_layers: tuple[int, ...] = ()  # with window > 0: the layers that attend over the whole image
    vision_mlp_matrices: int = 2  # fc1 + fc2 (CLIP, SigLIP, Qwen2-VL); gate + up + down (Qwen2.5-VL)
    temporal_patch: int = 1  # frames per patch in the patch embedding (Qwen-VL: an image is 2 equal frames)
    projector_hidden: int = 0  # hidden width of the two-layer projector; 0: the LLM width (LLaVA); Qwen's merger: 4C

    @classmethod
    def from_config(cls, config, llm_layers: int | None = None, patch_grid: tuple[int, int] | None = None) -> "Shape":
        """The shape of a LLaVA-family config, or of a Qwen2-VL / Qwen2.5-VL config on an image of ``patch_grid``
        patches (rows, columns; needed there, since a native-resolution tower has no fixed image size)."""
        v, t = config.vision_config, config.text_config
        llm = dict(
            llm_width=t.hidden_size, llm_mlp=t.intermediate_size, llm_layers=llm_layers or t.num_hidden_layers,
            heads=t.num_attention_heads, kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
            vocab=t.vocab_size,
        )
        if is_native(config):
            return cls._native(v, llm, patch_grid)
        return cls(
            vision_width=v.hidden_size, vision_mlp=v.intermediate_size, vision_layers=v.num_hidden_layers,
            patch_size=v.patch_size, image_size=v.image_size, vision_heads=v.num_attention_heads,
            cls_tokens=0 if getattr(v, "model_type", "").startswith("siglip") else 1,  # SigLIP has no CLS token
            **llm,
        )

    @classmethod
    def _native(cls, v, llm: dict, patch_grid: tuple[int, int] | None) -> "Shape":
        """Qwen2.5-VL (window attention, gated MLP, ``hidden_size`` = tower width) or Qwen2-VL (full attention,
        fc1/fc2 MLP of ``mlp_ratio``, ``embed_dim`` = tower width, ``hidden_size`` = merger output)."""
        if patch_grid is None or min(patch_grid) < 1 or any(side % v.spatial_merge_size for side in patch_grid):
            raise ValueError(f"a native-resolution tower's cost needs the image's patch grid, in multiples of the merge "
                             f"size {v.spatial_merge_size}; got {patch_grid}")
        windowed = getattr(v, "fullatt_block_indexes", None) is not None
        width = v.hidden_size if windowed else v.embed_dim
        return cls(
            vision_width=width, vision_mlp=v.intermediate_size if windowed else width * v.mlp_ratio,
            vision_layers=v.depth, patch_size=v.patch_size, image_size=0, vision_heads=v.num_heads, cls_tokens=0,
            patch_grid=tuple(patch_grid), merge=v.spatial_merge_size,
            window=v.window_size // v.spatial_merge_size // v.patch_size * v.spatial_merge_size if windowed else 0,  # whole merge groups
            full_attention_layers=tuple(v.fullatt_block_indexes) if windowed else (),
            vision_mlp_matrices=3 if windowed else 2, temporal_patch=v.temporal_patch_size,
            projector_hidden=width * v.spatial_merge_size**2, **llm,
        )

    @property
    def tower_patches(self) -> int:
        """Patches one tower forward runs on (one crop, or the native-resolution image)."""
        if self.patch_grid != (0, 0):
            return self.patch_grid[0] * self.patch_grid[1]
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_patches(self) -> int:
        """Candidate tokens of one crop (of the image, native resolution: its merged tokens)."""
        return self.tower_patches // self.merge**2

    @property
    def grid(self) -> tuple[int, int]:
        if self.patch_grid != (0, 0):
            return self.patch_grid[0] // self.merge, self.patch_grid[1] // self.merge
        side = self.image_size // self.patch_size
        return side, side

    @property
    def feature_width(self) -> int:
        """Width of a candidate's FEATURES: the tower width, or (merged towers) its merge group's patches side by side."""
        return self.vision_width * self.merge**2

    @property
    def num_candidates(self) -> int:
        """Patch tokens a method chooses from: the base crop's, then the tile canvas's."""
        return self.num_patches + self.canvas[0] * self.canvas[1]

    @property
    def newlines(self) -> int:
        return self.canvas[0]

    @property
    def image_tokens(self) -> int:
        """Image tokens of the stock prompt: every candidate and one newline per canvas row."""
        return self.num_candidates + self.newlines

    @property
    def candidate_grid(self) -> tuple[int, int]:
        """The grid a method ranks the candidates on: the crop's, or one row of all candidates when tiled."""
        return self.grid if self.crops == 1 else (1, self.num_candidates)

    @property
    def kv_width(self) -> int:
        return self.llm_width // self.heads * self.kv_heads


def window_sizes(length: int, window: int) -> list[int]:
    """Patches along one side of each window row (or column): windows of ``window`` patches laid from 0, the
    last one cut at the image's edge (Qwen2.5-VL pads the merged grid to whole windows and drops the padding)."""
    full, rest = divmod(length, window)
    return [window] * full + ([rest] if rest else [])


def attention_pairs(s: Shape, layer: int) -> int:
    """Query-key pairs of one tower layer on one crop: n^2 with full attention, the sum of each window's n_w^2
    in a window layer (windows of a x b patches hold a * b patches: the sum factorises over rows and columns)."""
    n = s.tower_patches + s.cls_tokens
    if not s.window or layer in s.full_attention_layers:
        return n * n
    rows, cols = (window_sizes(side, s.window) for side in s.patch_grid)
    return sum(a * a for a in rows) * sum(b * b for b in cols)


def vision_flops(s: Shape, layers: int | None = None, layer_tokens: list | None = None) -> float:
    """Patch embedding + ``layers`` (default all) encoder layers on CLS + N patches, once per crop.

    Per layer: q, k, v, o projections 4nd^2, scores and weighted sum 2d per query-key pair
    (``attention_pairs``: windows where the tower uses them), the MLP's two or three matrices.
    ``layer_tokens``: a tower that shrinks inside (an in-tower method, ``TowerState.layer_tokens``): per layer
    run, the tokens (CLS included) its attention and its MLP saw; only those layers are counted."""
    n, d = s.tower_patches + s.cls_tokens, s.vision_width
    embed = s.tower_patches * 3 * s.temporal_patch * s.patch_size**2 * d
    if layer_tokens is not None:
        if s.window or s.crops != 1:
            raise VTCError("per-layer token counts are modelled for one full-attention tower forward only")
        mlp = s.vision_mlp_matrices * d * s.vision_mlp
        layers_cost = sum(4 * a * d * d + 2 * a * a * d + m * mlp for a, m in layer_tokens)
        return 2.0 * (embed + layers_cost)
    depth = s.vision_layers if layers is None else layers
    dense = 4 * n * d * d + s.vision_mlp_matrices * n * d * s.vision_mlp
    attention = sum(2 * attention_pairs(s, layer) * d for layer in range(depth))
    return 2.0 * s.crops * (embed + depth * dense + attention)


def projector_flops(s: Shape, tokens: int) -> float:
    """The two-layer MLP projector on ``tokens`` image tokens: LLaVA's C -> D -> D, Qwen-VL's merger 4C -> 4C -> D."""
    width_in = s.feature_width
    hidden = s.projector_hidden or s.llm_width
    return 2.0 * tokens * (width_in * hidden + hidden * s.llm_width)


def llm_layer_macs(s: Shape, n: int, context: int | None = None) -> float:
    """Multiply-adds of one decoder layer for ``n`` new tokens attending to ``context`` positions (default n)."""
    d, ctx = s.llm_width, n if context is None else context
    projections = n * (2 * d * d + 2 * d * s.kv_width)  # q, o and k, v
    attention = 2 * n * ctx * d  # scores + weighted sum
    mlp = 3 * n * d * s.llm_mlp
    return projections + attention + mlp


def prefill_flops(s: Shape, tokens: int) -> float:
    """LLM prefill over a prompt of ``tokens`` positions (text + image), LM head on the last one."""
    return 2.0 * (s.llm_layers * llm_layer_macs(s, tokens) + s.llm_width * s.vocab)


def decode_flops(s: Shape, context: int) -> float:
    """One decoded token with ``context`` cached positions."""
    return 2.0 * (s.llm_layers * llm_layer_macs(s, 1, context + 1) + s.llm_width * s.vocab)


def kv_cache_bytes(s: Shape, tokens: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for ``tokens`` positions (fp16 by default)."""
    return 2 * s.llm_layers * tokens * s.kv_width * bytes_per_value


def request_cost(
    s: Shape, image_tokens: int, text_tokens: int, bytes_per_value: int = 2, vision_layers: int | None = None,
    projected_tokens: int | None = None, tower_layer_tokens: list | None = None,
) -> dict:
    """Costs of one request: vision tower on N patches, projector and prefill on the kept image tokens.

    ``projected_tokens``: the image tokens the projector makes (default all; a tiled family's
    newline tokens are learned embeddings, not projected). ``tower_layer_tokens``: an in-tower method's
    per-layer token counts (``vision_flops``)."""
    tokens = image_tokens + text_tokens
    vision = vision_flops(s, vision_layers, tower_layer_tokens)
    projector = projector_flops(s, image_tokens if projected_tokens is None else projected_tokens)
    prefill = prefill_flops(s, tokens)
    return {
        "vision_flops": vision,
        "projector_flops": projector,
        "prefill_flops": prefill,
        "total_prefill_flops": vision + projector + prefill,
        "decode_flops_per_token": decode_flops(s, tokens),
        "kv_cache_bytes": kv_cache_bytes(s, tokens, bytes_per_value),
    }


def staged_cost(
    s: Shape, n_image: int, stages: list[tuple[int, int]], text_tokens: int, bytes_per_value: int = 2,
    projected_tokens: int | None = None,
) -> dict:
    """Costs when image tokens are dropped inside the LLM: ``stages`` = (layer, image tokens kept from it on).

    Each decoder layer is charged for the tokens it sees; the KV cache holds, per layer, the
    tokens that layer saw (the full prompt for layers before the first stage).
    """
    counts, current, prev = [], n_image, 0
    for layer, keep in stages:
        counts += [current] * (layer - prev)
        current, prev = keep, layer
    counts += [current] * (s.llm_layers - prev)
    prefill = 2.0 * (sum(llm_layer_macs(s, c + text_tokens) for c in counts) + s.llm_width * s.vocab)
    vision, projector = vision_flops(s), projector_flops(s, n_image if projected_tokens is None else projected_tokens)
    kv = sum(2 * (c + text_tokens) * s.kv_width * bytes_per_value for c in counts)
    return {
        "vision_flops": vision, "projector_flops": projector, "prefill_flops": prefill,
        "total_prefill_flops": vision + projector + prefill,
        "decode_flops_per_token": 2.0 * (sum(llm_layer_macs(s, 1, c + text_tokens + 1) for c in counts) + s.llm_width * s.vocab),
        "kv_cache_bytes": kv,
    }


# ----------------------------------------------------------------------------- GPU time, estimated from FLOPs

A100_BF16_TFLOPS = 312.0  # NVIDIA A100 dense bf16/fp16 tensor-core peak (no sparsity), TFLOP/s
# Share of that peak a bf16 prefill of a few hundred tokens sustains (large matmuls, fused attention):
# model-FLOPs utilisation of 40-60% is typical there; 0.5 puts LLaVA-1.5-7B's LLM prefill at
# 64 image + 64 text tokens at 10.7 ms, next to the 9.2 ms the Recoverable Compression paper reports.
PREFILL_UTILISATION = 0.5
GPU_ASSUMPTION = f"A100 bf16, {A100_BF16_TFLOPS:.0f} TFLOP/s peak at {PREFILL_UTILISATION:.0%} utilisation"


def gpu_ms(flops: float, tflops: float = A100_BF16_TFLOPS, utilisation: float = PREFILL_UTILISATION) -> float:
    """Milliseconds a GPU of ``tflops`` peak needs for ``flops`` at ``utilisation`` of that peak.

    Compute-bound estimate: right for prefills of ~100 positions and more, where the matmuls are
    large; below that, reading the 7B weights (~14 GB at ~2 TB/s, ~7 ms) sets a floor it ignores.
    """
    if tflops <= 0 or not 0 < utilisation <= 1:
        raise ValueError(f"gpu_ms needs tflops > 0 and utilisation in (0, 1], got {tflops} and {utilisation}")
    return flops / (tflops * 1e12 * utilisation) * 1e3


def gpu_request_ms(cost: dict, tflops: float = A100_BF16_TFLOPS, utilisation: float = PREFILL_UTILISATION) -> dict:
    """Estimated GPU milliseconds of one request's prefill from its ``request_cost`` / ``staged_cost``:
    the vision tower, the LLM side (projector + prefill) and their sum."""
    vision = gpu_ms(cost["vision_flops"], tflops, utilisation)
    llm = gpu_ms(cost["projector_flops"] + cost["prefill_flops"], tflops, utilisation)
    return {"vision_ms": vision, "llm_prefill_ms": llm, "prefill_ms": vision + llm}
