"""Tiny random LLaVA / CLIP checkpoints built from configs, for tests and benchmarks.

They are saved with ``save_pretrained`` and meant to be loaded back with
``from_pretrained``, so that the real loading path is what gets exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "what is the color shape of small large object left right there a an in image how many red green blue yellow "
    "circle square triangle yes no one two three four describe picture"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def word_tokenizer(words=WORDS, model_max_length: int = 512, add_eos: bool = False):
    """A word-level fast tokenizer (no downloads): specials + a small vocabulary + punctuation.

    ``add_eos`` appends </s> to every text, as CLIP's tokenizer appends its end token
    (CLIP's text tower pools at the end token).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(dict.fromkeys(SPECIALS + ["USER", "ASSISTANT", "?", ".", ",", ":"] + list(words)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    if add_eos:
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def clip_configs(image_size=32, patch_size=8, hidden=32, layers=3, heads=4, projection=16, vocab=64):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection,
    )
    text = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=32, projection_dim=projection,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection), vision


def sharpened_clip_tower(image_size: int, patch_size: int, hidden: int, layers: int, heads: int, seed: int, sharpen: float):
    """A seeded tiny CLIP vision tower whose q/k projections are scaled by ``sharpen``, so its CLS attention is
    peaked (FlowCut's parity fixtures: scripts/make_flowcut_fixtures.py builds it, tests/test_flowcut.py rebuilds it)."""
    import torch
    from transformers import CLIPVisionModel

    _, config = clip_configs(image_size=image_size, patch_size=patch_size, hidden=hidden, layers=layers, heads=heads)
    torch.manual_seed(seed)
    tower = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for layer in tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return tower


def tiny_parts(image_size: int, patch_size: int, vision_layers: int, text_layers: int, max_positions: int):
    """The word tokenizer, a tiny CLIP vision config and a tiny Llama config that fit each other."""
    from transformers import LlamaConfig

    tokenizer = word_tokenizer()
    _, vision = clip_configs(image_size=image_size, patch_size=patch_size, layers=vision_layers)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, vision, text


def save_tiny_llava(out: str | Path, seed: int = 0, image_size=32, patch_size=8, vision_layers=3, text_layers=2) -> Path:
    """A random LLaVA-1.5-shaped model + processor + chat template, saved to ``out``."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return _save_tiny_clip_llava(out, seed, image_size, patch_size, vision_layers, text_layers, 256,
                                 LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, image_processor)


TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96]]


def save_tiny_llava_next(out: str | Path, seed: int = 0, image_size=32, patch_size=8, vision_layers=3, text_layers=2) -> Path:
    """A random LLaVA-NeXT-shaped model (any-resolution tiles of ``image_size``) + processor + chat template."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    pinpoints = [[image_size * a // 32, image_size * b // 32] for a, b in TINY_PINPOINTS]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    return _save_tiny_clip_llava(out, seed, image_size, patch_size, vision_layers, text_layers, 512,
                                 LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, image_processor,
                                 image_grid_pinpoints=pinpoints)


def _save_tiny_clip_llava(out, seed, image_size, patch_size, vision_layers, text_layers, max_positions,
                          config_class, model_class, processor_class, image_processor, **config_extra) -> Path:
    """A tiny CLIP-tower LLaVA of ``model_class`` with its processor, saved and ready for from_pretrained."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer, vision, text = tiny_parts(image_size, patch_size, vision_layers, text_layers, max_positions)
    config = config_class(
        vision_config=vision.to_dict(), text_config=text.to_dict(), **config_extra,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = model_class(config).eval()
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_clip(out: str | Path, seed: int = 1, image_size=32, patch_size=8, vision_layers=3) -> Path:
    """A random CLIPModel (both towers) + its tokenizer, saved to ``out``; matches ``save_tiny_llava``'s tower shape."""
    from transformers import CLIPModel

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(model_max_length=32, add_eos=True)
    config, _ = clip_configs(image_size=image_size, patch_size=patch_size, layers=vision_layers, vocab=len(tokenizer))
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TINY_OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 96], [96, 128]]


def save_tiny_llava_onevision(out: str | Path, seed: int = 0, image_size=32, patch_size=8, vision_layers=3, text_layers=2) -> Path:
    """A random LLaVA-OneVision-shaped model (SigLIP tower, Qwen2 decoder, anyres_max_9 tiles of ``image_size``)
    + processor + chat template. The largest pinpoint (3x4 tiles) is over anyres_max_9's limit, so the model
    shrinks such a canvas bilinearly."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from .models.llava_onevision import ImageOnlyOnevisionProcessor

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})  # the processor counts both
    vision = SiglipVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=vision_layers, num_attention_heads=4, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    pinpoints = [[image_size * a // 32, image_size * b // 32] for a, b in TINY_OV_PINPOINTS]
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_grid_pinpoints=pinpoints,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints,
    )
    processor = ImageOnlyOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def save_tiny_qwen_vl(out: str | Path, version: str = "2.5", seed: int = 0, patch_size=4, vision_layers=4, text_layers=4) -> Path:
    """A random Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) model + image-only processor + chat template.

    Patches of ``patch_size`` pixels merged 2x2, so an image of H x W (multiples of 2 * patch_size) gives
    (H / 2p) x (W / 2p) language-model tokens. Qwen2.5-VL: window attention in windows of 2x2 merged tokens,
    full attention in layers 1 and 3 (``fullatt_block_indexes``)."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from .models.qwen_vl import ImageOnlyQwenVLProcessor

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer, ids = qwen_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if version == "2.5":
        vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=patch_size,
                      out_hidden_size=48, window_size=4 * patch_size, fullatt_block_indexes=[1, 3])
        prefix = "Qwen2_5_VL"
    else:
        vision = dict(depth=vision_layers, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=4, patch_size=patch_size)
        prefix = "Qwen2VL"
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text, vision_config=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, min_pixels=(4 * patch_size) ** 2, max_pixels=(40 * patch_size) ** 2,
    )
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    processor.processor_class = f"{prefix}Processor"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def qwen_tokenizer():
    """The word tokenizer with Qwen-VL's vision special tokens, and their ids by name."""
    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]}
    )
    tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end", "image_pad", "video_pad")}
    return tokenizer, ids


def save_tiny_qwen3_vl(out: str | Path, seed: int = 0, patch_size=4, vision_layers=4, text_layers=4,
                       deepstack_layers=(0, 1, 2)) -> Path:
    """A random Qwen3-VL model (DeepStack) + image-only processor + chat template.

    Patches of ``patch_size`` pixels merged 2x2 (an H x W image gives (H / 2p) x (W / 2p) tokens), a learned
    8 x 8 position table interpolated to each grid, full attention in every tower block; the tower layers
    ``deepstack_layers`` feed the decoder's first len(deepstack_layers) layers (DeepStack)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from .models.qwen3_vl import ImageOnlyQwen3VLProcessor

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer, ids = qwen_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2], "mrope_interleaved": True},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(depth=vision_layers, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=patch_size,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=48, num_position_embeddings=64,
                  deepstack_visual_indexes=list(deepstack_layers))
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, min_pixels=(4 * patch_size) ** 2, max_pixels=(40 * patch_size) ** 2,
    )
    processor = ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
