"""Analytical cost model: FLOPs of the vision tower, projector and LLM prefill/decode, and KV-cache bytes.

Conventions (those of FastV and of the Recoverable Compression paper, whose 8.5T FLOPs
for LLaVA-1.5-7B at 576 image tokens this reproduces): FLOPs = 2 x multiply-adds;
attention scores and weighted sums count the full n x n (no causal halving); Llama's
gated MLP counts its three matrices; norms, softmax, RoPE and biases are ignored (< 1%).
The LM head runs on the last position only (``generate`` keeps one logit row).

Tiled families (LLaVA-NeXT, LLaVA-OneVision): the vision tower runs once per crop (base + tiles);
the projector runs on the patch tokens; the language model also sees one newline token per row
of the tile canvas (``Shape.canvas``), which the projector does not make.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @classmethod
    def from_config(cls, config, llm_layers: int | None = None) -> "Shape":
        v, t = config.vision_config, config.text_config
        return cls(
            vision_width=v.hidden_size, vision_mlp=v.intermediate_size, vision_layers=v.num_hidden_layers,
            patch_size=v.patch_size, image_size=v.image_size,
            llm_width=t.hidden_size, llm_mlp=t.intermediate_size, llm_layers=llm_layers or t.num_hidden_layers,
            heads=t.num_attention_heads, kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
            vocab=t.vocab_size, vision_heads=v.num_attention_heads,
            cls_tokens=0 if getattr(v, "model_type", "").startswith("siglip") else 1,  # SigLIP has no CLS token
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

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


def vision_flops(s: Shape, layers: int | None = None) -> float:
    """Patch embedding + ``layers`` (default all) encoder layers on CLS + N tokens, once per crop."""
    n, d = s.num_patches + s.cls_tokens, s.vision_width
    embed = s.num_patches * 3 * s.patch_size**2 * d
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * s.vision_mlp
    return 2.0 * s.crops * (embed + (s.vision_layers if layers is None else layers) * per_layer)


def projector_flops(s: Shape, tokens: int) -> float:
    """LLaVA's two-layer MLP projector on ``tokens`` image tokens."""
    return 2.0 * tokens * (s.vision_width * s.llm_width + s.llm_width * s.llm_width)


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
    projected_tokens: int | None = None,
) -> dict:
    """Costs of one request: vision tower on N patches, projector and prefill on the kept image tokens.

    ``projected_tokens``: the image tokens the projector makes (default all; a tiled family's
    newline tokens are learned embeddings, not projected)."""
    tokens = image_tokens + text_tokens
    vision = vision_flops(s, vision_layers)
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
