"""The analytical cost model against torch's FLOP counter and a hand computation for LLaVA-1.5-7B."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

from vtc.cost import Shape, decode_flops, kv_cache_bytes, llm_layer_macs, prefill_flops, projector_flops, request_cost, staged_cost, vision_flops
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


def test_llava15_7b_by_hand_and_the_papers_numbers():
    s = Shape.from_config(llava15_config())
    assert (s.llm_layers, s.llm_width, s.llm_mlp, s.num_patches, s.kv_width) == (32, 4096, 11008, 576, 4096)
    # one decoder layer, 640 positions (576 image + 64 text): 4 n d^2 + 2 n^2 d + 3 n d m multiply-adds
    n, d, m = 640, 4096, 11008
    layer = 4 * n * d * d + 2 * n * n * d + 3 * n * d * m  # 42.9G + 3.4G + 86.6G = 132.9G MACs
    assert layer == 132_875_550_720
    hand = 2 * (32 * layer + d * 32064)
    assert prefill_flops(s, 640) == hand
    assert hand / 1e12 == pytest.approx(8.5, abs=0.05)  # the paper: 8.5T FLOPs at 576 image tokens
    assert prefill_flops(s, 58 + 64) / 1e12 == pytest.approx(1.5, abs=0.1)  # ~10% of the tokens: 1.5T
    # KV cache: 2 (k, v) x 32 layers x 640 positions x 4096 x 2 bytes = 335.5 MB
    assert kv_cache_bytes(s, 640) == 2 * 32 * 640 * 4096 * 2
    # decoding one token at context 640: the same layer formula with n = 1, 641 positions attended
    assert decode_flops(s, 640) == 2 * (32 * (4 * d * d + 2 * 641 * d + 3 * d * m) + d * 32064)
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
