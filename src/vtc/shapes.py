"""Real LLaVA-1.5 shapes with random weights, for speed and overhead measurements (no download needed).

LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, d=1024, 16 heads, 336 px, patch 14 -> 576
patches), a 2-layer GELU MLP projector 1024 -> 4096, and a Llama-2-7B-shaped language
model (32 layers, d=4096, 32 heads, MLP 11008, vocabulary 32064). ``llm_layers`` builds
fewer decoder layers so the model fits a CPU machine; per-layer costs scale linearly.
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