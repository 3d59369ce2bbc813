"""Real LLaVA-1.5 shapes with random weights, for speed and overhead measurements (no download needed).

LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, d=1024, 16 heads, 336 px, patch 14 -> 576
patches), a 2-layer GELU MLP projector 1024 -> 4096, and a Llama-2-7B-shaped language
model (32 layers, d=4096, 32 heads, MLP 11008, vocabulary 32064). ``llm_layers`` builds
fewer decoder layers so the model fits a CPU machine; per-layer costs scale linearly.
Also LLaVA-NeXT-7B, LLaVA-OneVision-7B and Qwen2.5-VL-7B (each section says where its values come from).
"""

from __future__ import annotations

import torch

from .models.clip_text import ClipTextScorer
from .testing import word_tokenizer

IMAGE_TOKEN_ID = 32000
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
VIT_L_336 = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)


def llava15_config(llm_layers: int = 32, **llm_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        **{**LLAMA_7B, "num_hidden_layers": llm_layers, **llm_overrides},
    )
    vision = CLIPVisionConfig(**VIT_L_336, projection_dim=768)
    return LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def build_llava15(llm_layers: int = 2, dtype: torch.dtype = torch.float32, **llm_overrides):
    """A random-weight LLaVA-1.5-7B-shaped model (``llm_layers`` decoder layers), in eval mode."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava15_config(llm_layers, **llm_overrides))
    return model.to(dtype).eval()


def clip_text_scorer_vit_l() -> ClipTextScorer:
    """CLIP ViT-L/14's text tower shape (12 layers, d=768) with random weights, projecting into the 1024-d patches."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = word_tokenizer(model_max_length=77, add_eos=True)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, projection_dim=768, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
    )
    text = CLIPTextModelWithProjection(config).eval()
    return ClipTextScorer(text, tokenizer, torch.randn(768, 1024) * 0.02, torch.ones(1024), torch.zeros(1024), 1e-5)


# ----------------------------------------------------------------------------- LLaVA-NeXT-7B (llava-v1.6-vicuna-7b)

# llava-v1.6's any-resolution canvases (height, width), in pixels; a 672x672 image is the base crop plus 2x2 tiles.
LLAVA_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_IMAGE = (672, 672)  # the image `vtc speed --shape llava-next-7b` times: base + 4 tiles


def llava_next_config(llm_layers: int = 32, **llm_overrides):
    """LLaVA-NeXT-7B: LLaVA-1.5-7B's CLIP tower, projector and Vicuna/Llama-7B decoder, with llava-v1.6's tiles."""
    from transformers import LlavaNextConfig

    base = llava15_config(llm_layers, **llm_overrides)
    return LlavaNextConfig(
        vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(), image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=LLAVA_V16_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_llava_next(llm_layers: int = 2, dtype: torch.dtype = torch.float32, **llm_overrides):
    """A random-weight LLaVA-NeXT-7B-shaped model (``llm_layers`` decoder layers), in eval mode."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(llava_next_config(llm_layers, **llm_overrides))
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- LLaVA-OneVision-7B (llava-onevision-qwen2-7b-ov)

# llava-onevision-qwen2-7b-ov(-hf): SigLIP-so400m-patch14-384 with its last layer removed (26 of 27 layers; patch
# tokens only, no CLS) and a Qwen2-7B decoder. Values as in transformers' LlavaOnevisionConfig defaults (which are
# that checkpoint's vision tower and pinpoints) and Qwen2-7B's config.json.
SIGLIP_SO400M_384 = dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                         num_attention_heads=16)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064)
ONEVISION_PINPOINTS = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]  # (1x1 .. 6x6) x 384 px
ONEVISION_MAX_TILES = 9  # anyres_max_9: a canvas of more than 9 crops' patches is scaled down to about that many


ONEVISION_IMAGE_TOKEN_ID = 151646  # "<image>" in the checkpoint's Qwen2 tokenizer


def onevision_config(llm_layers: int = QWEN2_7B["num_hidden_layers"], **llm_overrides):
    """LLaVA-OneVision-7B: SigLIP-so400m/384 (26 layers kept), a 2-layer GELU projector, Qwen2-7B."""
    from transformers import LlavaOnevisionConfig

    text = {**QWEN2_7B, "num_hidden_layers": llm_layers, "model_type": "qwen2", "rope_theta": 1_000_000.0,
            "max_position_embeddings": 32768, **llm_overrides}
    return LlavaOnevisionConfig(
        vision_config={**SIGLIP_SO400M_384, "model_type": "siglip_vision_model"}, text_config=text,
        image_token_id=ONEVISION_IMAGE_TOKEN_ID, image_grid_pinpoints=ONEVISION_PINPOINTS,
        vision_aspect_ratio=f"anyres_max_{ONEVISION_MAX_TILES}", vision_feature_layer=-1, vision_feature_select_strategy="full",
    )


def build_onevision(llm_layers: int = 2, dtype: torch.dtype = torch.float32, **llm_overrides):
    """A random-weight LLaVA-OneVision-7B-shaped model (``llm_layers`` decoder layers), in eval mode."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(onevision_config(llm_layers, **llm_overrides))
    return model.to(dtype).eval()


def onevision_canvas(image_size=NEXT_IMAGE) -> tuple[int, int, int]:
    """(tiles, canvas rows, canvas columns) of LLaVA-OneVision-7B for an image of ``image_size`` (height, width):
    the pinpoint transformers picks, unpadded, then anyres_max_9's scale-down (as ``pack_image_features``)."""
    import math

    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = SIGLIP_SO400M_384["image_size"] // SIGLIP_SO400M_384["patch_size"]
    rows, cols = get_anyres_image_grid_shape(list(image_size), ONEVISION_PINPOINTS, SIGLIP_SO400M_384["image_size"])
    canvas = unpad_image(torch.zeros(1, rows * side, cols * side), list(image_size))
    h, w = canvas.shape[1:]
    ratio = math.sqrt(h * w / (ONEVISION_MAX_TILES * side**2))
    if ratio > 1.1:
        h, w = int(h // ratio), int(w // ratio)
    return rows * cols, h, w


def onevision_shape(image_size=NEXT_IMAGE):
    """The cost model's Shape of LLaVA-OneVision-7B on one image of ``image_size`` (base crop + tiles + newlines)."""
    from dataclasses import replace

    from .cost import Shape

    tiles, rows, cols = onevision_canvas(image_size)
    return replace(Shape.from_config(onevision_config()), crops=1 + tiles, canvas=(rows, cols))

# ----------------------------------------------------------------------------- Qwen2.5-VL-7B (Qwen2.5-VL-7B-Instruct)

# Qwen/Qwen2.5-VL-7B-Instruct's config.json, vision_config: 32 blocks of width 1280 (16 heads of 80), a gated SiLU MLP
# of 3420 (gate, up, down), patches of 14 px over 2 frames (an image is repeated to 2), merged 2 x 2 by the PatchMerger
# (RMSNorm, Linear 5120 -> 5120, GELU, Linear 5120 -> 3584), window attention in windows of 112 px (8 x 8 patches, 4 x 4
# merged tokens) except blocks 7, 15, 23 and 31. transformers' Qwen2_5_VLVisionConfig defaults agree on every one of
# these except hidden_size (its default is 3584, the merger's output; the checkpoint says 1280) and tokens_per_second
# (4 against the checkpoint's 2, video only), so every value is set here.
QWEN25VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", in_channels=3,
                       patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584, tokens_per_second=2)
# Its language model is Qwen2-7B's shape (QWEN2_7B: 3584 wide, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocabulary
# 152064), with the checkpoint's M-RoPE sections (16, 24, 24) of the 64 rotary frequencies, rope_theta 1e6, RMSNorm eps
# 1e-6, 128000 positions and untied embeddings; transformers' Qwen2_5_VLTextConfig defaults are the 72B's (8192 wide,
# 80 layers), so none of them is relied on.
QWEN25VL_TEXT = dict(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
                     max_position_embeddings=128000, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645)
# special tokens of the checkpoint's tokenizer (also transformers' Qwen2_5_VLConfig defaults)
QWEN25VL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
# preprocessor_config.json (Qwen2VLImageProcessor): min_pixels 3136 = 16 patches of 14 px, max_pixels 12845056 = 65536
# patches; the image is resized to multiples of 28 px (patch x merge) by smart_resize. Counted in patches so that a
# tiny test model of another patch size keeps the same limits.
QWEN_MIN_PATCHES, QWEN_MAX_PATCHES = 3136 // 14**2, 12845056 // 14**2
QWEN_IMAGE = (1024, 1024)  # the picture `vtc speed --shape qwen2.5-vl-7b` times: 1036 x 1036 after smart_resize, 37 x 37 tokens


def qwen25vl_config(llm_layers: int = QWEN2_7B["num_hidden_layers"], **llm_overrides):
    """Qwen2.5-VL-7B: its 32-block window-attention tower and 2 x 2 merger, and the Qwen2-7B-shaped decoder."""
    from transformers import Qwen2_5_VLConfig

    text = {**QWEN2_7B, **QWEN25VL_TEXT, "num_hidden_layers": llm_layers, **llm_overrides}
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN25VL_VISION), tie_word_embeddings=False, **QWEN25VL_TOKENS)


def build_qwen25vl(llm_layers: int = 2, dtype: torch.dtype = torch.float32, **llm_overrides):
    """A random-weight Qwen2.5-VL-7B-shaped model (``llm_layers`` decoder layers), in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(llm_layers, **llm_overrides))
    return model.to(dtype).eval()


def qwen_patch_grid(image_size=QWEN_IMAGE, patch_size: int = 14, merge: int = 2) -> tuple[int, int]:
    """(rows, columns) of patches the Qwen-VL image processor makes of an image of ``image_size`` (height, width):
    smart_resize to multiples of patch x merge pixels within the published min/max pixels (in patches)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    height, width = smart_resize(*image_size, factor=patch_size * merge, min_pixels=QWEN_MIN_PATCHES * patch_size**2,
                                 max_pixels=QWEN_MAX_PATCHES * patch_size**2)
    return height // patch_size, width // patch_size


def qwen25vl_shape(image_size=QWEN_IMAGE):
    """The cost model's Shape of Qwen2.5-VL-7B on one image of ``image_size`` (its own patch grid, 28 LLM layers)."""
    from .cost import Shape

    return Shape.from_config(qwen25vl_config(), patch_grid=qwen_patch_grid(image_size))
