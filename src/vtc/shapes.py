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
