"""vtc speed on a tiny LLaVA: the measurement plumbing, the 32-layer extrapolation and the KV bytes."""

import json

import pytest
from transformers import LlavaForConditionalGeneration

from vtc.models.clip_text import ClipTextScorer
from vtc.speed import FULL_DEPTH, SpeedBench, run_speed, write_outputs


@pytest.fixture(scope="module")
def bench(tiny_dirs):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0]).eval()
    return SpeedBench(text_tokens=6, decode_tokens=2, model=model, text_scorer=ClipTextScorer.from_pretrained(tiny_dirs[1]))


def test_speed_rows_measure_what_they_claim(bench, tmp_path):
    _, results = run_speed(["fastervlm", "recoverable", "downsample"], ["4", "auto"], 2, 2, 6, 2, bench=bench)
    by = {(r["method"], r["budget"]): r for r in results}
    assert ("fastervlm", "auto") not in by and ("recoverable", "auto") in by  # auto only where a method has one
    full, pruned = by[("none", "auto")], by[("fastervlm", "4")]
    assert full["tokens"] == 16 and pruned["tokens"] == by[("downsample", "4")]["tokens"] == 4
    cfg = bench.model.config.text_config
    kv_width = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    for r, tokens in ((full, 16), (pruned, 4)):
        # measured after prefill: k and v of every built layer, fp32, image + text positions
        positions = tokens + 6
        assert r["kv_bytes_measured"] == 2 * cfg.num_hidden_layers * positions * kv_width * 4
    assert full["flops_ratio"] == 1.0 and pruned["flops_ratio"] > 1.0
    assert all(r["e2e_prefill_ms_32_layers"] > 0 and r["speedup"] > 0 for r in results)
    write_outputs(results, {"llm_layers_built": 2}, tmp_path)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["results"] == results and (tmp_path / "speed.png").stat().st_size > 10_000


def test_extrapolation_scales_only_the_decoder_layers(bench):
    assert bench.llm_layers == 2
    # 10 ms measured, 6 of them in 2 layers: 4 ms outside + 3 ms per layer x 32
    assert bench.to_full_depth(10.0, [2.0, 4.0]) == pytest.approx(4.0 + 3.0 * FULL_DEPTH)
    # in-LLM, one stage at layer 2 of 32: built layer 0 stands for 2 layers, built layer 1 for 30
    assert bench.to_full_depth(10.0, [4.0, 2.0], [2, 30]) == pytest.approx(4.0 + 2 * 4.0 + 30 * 2.0)


def test_in_llm_methods_are_timed_by_stage(bench):
    from vtc.cost import request_cost, staged_cost

    _, results = run_speed(["fastv", "dart"], ["8"], 2, 1, 6, 2, bench=bench)
    by = {r["method"]: r for r in results}
    for name in ("fastv", "dart"):
        r = by[name]
        assert r["stages"] and abs(r["tokens"] - 8) <= 0.5  # the budget is the 32-layer average
        (layer, keep), = r["stages"]
        assert layer == 2 and (2 * 16 + 30 * keep) / 32 == pytest.approx(r["tokens"])
        full = request_cost(bench.shape, 16, 6)["total_prefill_flops"]
        assert r["flops_ratio"] == round(full / staged_cost(bench.shape, 16, r["stages"], 6)["total_prefill_flops"], 3)
