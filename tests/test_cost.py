"""The analytical cost model against torch's FLOP counter and a hand computation for LLaVA-1.5-7B."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from vtc.cost import Shape, decode_flops, gpu_ms, gpu_request_ms, kv_cache_bytes, llm_layer_macs, prefill_flops, projector_flops, request_cost, staged_cost, vision_flops
from vtc.shapes import llava15_config


@pytest.fixture(scope="module")
def eager_tiny(tiny_dirs):
    # eager attention runs the scores as plain matmuls, which the FLOP counter sees (full n x n, like our convention)
    return LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0], attn_implementation="eager").eval()


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_flops_match_torch_flop_counter_on_a_real_forward(eager_tiny):
    s = Shape.from_config(eager_tiny.config)
    lm = eager_tiny.model.language_model

    def prefill(n):
        hidden = lm(inputs_embeds=torch.randn(1, n, s.llm_width)).last_hidden_state
        eager_tiny.lm_head(hidden[:, -1:])

    for n in (7, 30):
        assert counted(lambda: prefill(n)) == pytest.approx(prefill_flops(s, n), rel=1e-9)
    pixels = torch.randn(1, 3, s.image_size, s.image_size)
    assert counted(lambda: eager_tiny.model.vision_tower(pixels)) == pytest.approx(vision_flops(s), rel=1e-9)
    feats = torch.randn(1, 5, s.vision_width)
    assert counted(lambda: eager_tiny.model.multi_modal_projector(feats)) == pytest.approx(projector_flops(s, 5), rel=1e-9)


@pytest.fixture(scope="module")
def llama7b_on_meta():
    """Llama-7B of LLaVA-1.5 with eager attention on the meta device: real shapes, no memory, no compute."""
    config = llava15_config().text_config
    config._attn_implementation = "eager"
    with torch.device("meta"):
        return LlamaForCausalLM(config).eval()


def test_llava15_7b_against_the_flop_counter_and_the_papers_numbers(llama7b_on_meta):
    s = Shape.from_config(llava15_config())
    assert (s.llm_layers, s.llm_width, s.llm_mlp, s.num_patches, s.kv_width) == (32, 4096, 11008, 576, 4096)

    def prefill(n):
        out = llama7b_on_meta.model(inputs_embeds=torch.empty(1, n, s.llm_width, device="meta"), use_cache=True)
        llama7b_on_meta.lm_head(out.last_hidden_state[:, -1:])
        return out.past_key_values

    cache = None

    def run():
        nonlocal cache
        cache = prefill(640)

    assert counted(run) == pytest.approx(prefill_flops(s, 640), rel=1e-9)  # 576 image + 64 text positions
    assert prefill_flops(s, 640) / 1e12 == pytest.approx(8.5, abs=0.05)  # the paper: 8.5T FLOPs at 576 image tokens
    assert counted(lambda: prefill(58 + 64)) == pytest.approx(prefill_flops(s, 58 + 64), rel=1e-9)
    assert prefill_flops(s, 58 + 64) / 1e12 == pytest.approx(1.5, abs=0.1)  # ~10% of the tokens: 1.5T
    # KV cache: what the model's own cache holds at 640 positions, at 2 bytes a value
    held = sum(t.numel() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(s, 640) == held * 2 == pytest.approx(335.5e6, rel=1e-3)
    # one decoded token attending to the 640 cached positions and itself
    step = lambda: llama7b_on_meta.lm_head(llama7b_on_meta.model(  # noqa: E731
        inputs_embeds=torch.empty(1, 1, s.llm_width, device="meta"), cache=cache, use_cache=True).last_hidden_state)
    assert counted(step) == pytest.approx(decode_flops(s, 640), rel=1e-9)
    cost = request_cost(s, image_tokens=64, text_tokens=64)
    assert cost["total_prefill_flops"] == cost["vision_flops"] + cost["projector_flops"] + cost["prefill_flops"]


def test_staged_cost_charges_each_layer_for_the_tokens_it_sees():
    s = Shape.from_config(llava15_config())
    assert staged_cost(s, 576, [], 64)["prefill_flops"] == request_cost(s, 576, 64)["prefill_flops"]
    # FastV K=2 keeping 64: 2 layers at 640 positions, 30 at 128
    by_hand = 2 * (2 * llm_layer_macs(s, 640) + 30 * llm_layer_macs(s, 128) + 4096 * 32064)
    staged = staged_cost(s, 576, [(2, 64)], 64)
    assert staged["prefill_flops"] == by_hand
    assert staged["kv_cache_bytes"] == (2 * 640 + 30 * 128) * 2 * 4096 * 2


def test_gpu_time_is_flops_over_the_stated_throughput():
    assert gpu_ms(156e12) == pytest.approx(1000.0)  # defaults: 312 TFLOP/s at 50% -> 156e12 FLOPs take one second
    assert gpu_ms(1e12, tflops=100.0, utilisation=0.25) == pytest.approx(40.0)  # 1e12 / 25e12 s
    for tflops, utilisation in ((0.0, 0.5), (312.0, 0.0), (312.0, 1.5)):
        with pytest.raises(ValueError, match="utilisation"):
            gpu_ms(1.0, tflops, utilisation)


def test_gpu_request_time_for_llava15_7b_by_hand():
    est = gpu_request_ms(request_cost(Shape.from_config(llava15_config()), image_tokens=64, text_tokens=64))
    # one decoder layer on 128 positions: q, k, v, o 128 x 4 x 4096^2 + scores and sum 2 x 128^2 x 4096
    # + gated MLP 3 x 128 x 4096 x 11008 = 26,038,239,232 multiply-adds; 32 layers + LM head 4096 x 32064, doubled:
    # 1,666,709,979,136 FLOPs; projector 2 x 64 x (1024 x 4096 + 4096^2) = 2,684,354,560; at 156e12 FLOP/s:
    assert est["llm_prefill_ms"] == pytest.approx(1_669_394_333_696 / 156e9, rel=1e-12)  # 10.70 ms
    # CLIP ViT-L/14-336: 577 positions, 24 layers of 4 x 577 x 1024^2 + 2 x 577^2 x 1024 + 2 x 577 x 1024 x 4096,
    # patch embedding 576 x 3 x 14^2 x 1024, doubled: 381,918,216,192 FLOPs
    assert est["vision_ms"] == pytest.approx(381_918_216_192 / 156e9, rel=1e-12)  # 2.45 ms
    assert est["prefill_ms"] == pytest.approx((1_669_394_333_696 + 381_918_216_192) / 156e9, rel=1e-12)


# ----------------------------------------------------------------------------- the tiled shapes

NEXT_672 = dict(crops=5, canvas=(48, 48))  # llava-v1.6 on a 672x672 image: base + 2x2 tiles, 48x48 canvas, no unpadding


def meta_model(cls, config):
    config._attn_implementation = "eager"  # the FLOP counter sees eager attention's matmuls (the full n x n)
    with torch.device("meta"):
        return cls(config).eval()


def test_llava_next_7b_on_a_672_image_against_the_flop_counter_and_by_hand(llama7b_on_meta):
    from dataclasses import replace

    from transformers import CLIPVisionModel
    from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

    from vtc.shapes import llava_next_config

    config = llava_next_config()
    s = replace(Shape.from_config(config), **NEXT_672)
    assert (s.num_candidates, s.newlines, s.image_tokens) == (576 + 2304, 48, 2928)
    cost = request_cost(s, 2928, 64, projected_tokens=2880)
    # the tower runs on every crop; the projector on the 2880 patch tokens; the LLM on 2928 image + 64 text positions
    tower = meta_model(CLIPVisionModel, config.vision_config)
    assert counted(lambda: tower(torch.empty(5, 3, 336, 336, device="meta"))) == pytest.approx(cost["vision_flops"], rel=1e-9)
    projector = meta_model(LlavaNextMultiModalProjector, config)
    assert counted(lambda: projector(torch.empty(1, 2880, 1024, device="meta"))) == pytest.approx(cost["projector_flops"], rel=1e-9)

    def prefill():
        hidden = llama7b_on_meta.model(inputs_embeds=torch.empty(1, 2992, 4096, device="meta")).last_hidden_state
        llama7b_on_meta.lm_head(hidden[:, -1:])

    assert counted(prefill) == pytest.approx(cost["prefill_flops"], rel=1e-9)
    # by hand: one decoder layer on 2992 positions: 2992 x 4 x 4096^2 + 2 x 2992^2 x 4096 + 3 x 2992 x 4096 x 11008
    # = 678,841,810,944 multiply-adds; 32 layers + LM head 4096 x 32064, doubled: 43,446,138,568,704 FLOPs;
    # projector 2 x 2880 x (1024 x 4096 + 4096^2) = 120,795,955,200; tower 5 x 381,918,216,192 (LLaVA-1.5's one crop)
    assert cost["prefill_flops"] == 43_446_138_568_704 and cost["projector_flops"] == 120_795_955_200
    assert cost["vision_flops"] == 5 * 381_918_216_192
    est = gpu_request_ms(cost)
    assert est["llm_prefill_ms"] == pytest.approx(279.28, abs=0.01) and est["vision_ms"] == pytest.approx(12.24, abs=0.01)
    # 10% of the candidates (288) and the 48 newline rows they keep: 400 positions; layer 82,260,787,200 multiply-adds
    ten = request_cost(s, 288 + 48, 64, projected_tokens=288)
    assert ten["prefill_flops"] == 2 * (32 * 82_260_787_200 + 4096 * 32064)
    assert cost["prefill_flops"] / ten["prefill_flops"] == pytest.approx(8.25, abs=0.01)  # the LLM prefill alone: 8.3x
    assert cost["total_prefill_flops"] / ten["total_prefill_flops"] == pytest.approx(6.33, abs=0.01)  # with the 5-crop tower
    staged = staged_cost(s, 2928, [(2, 288)], 64, projected_tokens=2880)
    assert staged["projector_flops"] == cost["projector_flops"] and staged["vision_flops"] == cost["vision_flops"]


def test_llava_onevision_7b_tokens_from_its_processor_and_flops_from_the_counter():
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from vtc.shapes import ONEVISION_PINPOINTS, QWEN2_7B, SIGLIP_SO400M_384, onevision_shape

    # the processor's own token count (built bare: its video processor needs torchvision), anyres_max_9
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    processor.image_processor = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=ONEVISION_PINPOINTS)
    processor.num_image_tokens, processor.vision_aspect_ratio = 729, "anyres_max_9"
    for size in ((672, 672), (1000, 3000), (2000, 1500), (300, 500)):  # square, wide (scaled down to ~9 crops), tall, small
        assert onevision_shape(size).image_tokens == processor._get_number_of_features(*size, 384, 384), size
    s = onevision_shape((672, 672))
    # 2x2 tiles of 27x27 patches: 729 base + 54 x 54 canvas + 54 newlines = 3699
    assert (s.crops, s.canvas, s.num_candidates, s.image_tokens) == (5, (54, 54), 3645, 3699)
    assert (s.llm_layers, s.kv_width, s.cls_tokens) == (28, 512, 0)  # 4 KV heads of 128
    cost = request_cost(s, 3699, 64, projected_tokens=3645)
    tower = meta_model(SiglipVisionModel, SiglipVisionConfig(**SIGLIP_SO400M_384, vision_use_head=False))
    assert counted(lambda: tower(torch.empty(5, 3, 384, 384, device="meta"))) == pytest.approx(cost["vision_flops"], rel=1e-9)
    qwen = meta_model(Qwen2ForCausalLM, Qwen2Config(**QWEN2_7B))

    def prefill():
        hidden = qwen.model(inputs_embeds=torch.empty(1, 3699 + 64, 3584, device="meta")).last_hidden_state
        qwen.lm_head(hidden[:, -1:])

    assert counted(prefill) == pytest.approx(cost["prefill_flops"], rel=1e-9)
    assert kv_cache_bytes(s, 3763) == 2 * 28 * 3763 * 512 * 2


def test_a_tower_that_shrinks_inside_is_charged_per_layer_as_torch_counts_it(eager_tiny):
    """In-tower methods: each layer's attention and MLP are charged the tokens they ran on (TowerState.layer_tokens),
    which equals torch's count of the loop's forward; at full size every layer gives the stock tower's count."""
    from vtc.models.tower_loop import Reduction, run_tower

    s = Shape.from_config(eager_tiny.config)
    tower = eager_tiny.model.vision_tower  # CLIPVisionModel in transformers 5: embeddings, pre_layrnorm, encoder
    hidden = tower.pre_layrnorm(tower.embeddings(torch.randn(1, 3, s.image_size, s.image_size)))
    heads = eager_tiny.config.vision_config.num_attention_heads

    class DropTwo:  # drops the last two tokens in every layer (no arithmetic of its own)
        size_bias = False

        def __init__(self, stage):
            self.stage = stage

        def __call__(self, view):
            return Reduction(torch.arange(view.hidden.shape[1] - 2).expand(view.hidden.shape[0], -1))

    n = s.tower_patches + s.cls_tokens
    for stage in ("attention", "layer"):
        state = {}
        flops = counted(lambda: state.update(out=run_tower(tower.encoder.layers, hidden, DropTwo(stage), 1, heads)))
        tokens = state["out"].layer_tokens
        after = n - 2 if stage == "attention" else n  # ToMe's place: the MLP already runs on fewer tokens
        assert tokens[0] == (n, after) and tokens[1][0] == n - 2 and len(tokens) == s.vision_layers
        assert flops == pytest.approx(vision_flops(s, layer_tokens=tokens) - vision_flops(s, layers=0), rel=1e-9)
    assert vision_flops(s, layer_tokens=[(n, n)] * s.vision_layers) == pytest.approx(vision_flops(s), rel=1e-12)
    assert request_cost(s, 4, 6, tower_layer_tokens=tokens)["vision_flops"] == vision_flops(s, layer_tokens=tokens)
