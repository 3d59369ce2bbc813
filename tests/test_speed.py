"""vtc speed: the summary worked by hand at 4 built layers, and the measurement plumbing on a tiny LLaVA."""

import json
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaForConditionalGeneration
from typer.testing import CliRunner

from vtc import speed
from vtc.cost import Shape, request_cost
from vtc.methods import Budget, Method, Selection, Signal, VTCError, get
from vtc.models.clip_text import ClipTextScorer
from vtc.speed import (FULL_DEPTH, Row, Sample, SpeedBench, random_signals, run_speed, selection_ms_per_image, summarise_rows,
                       to_full_depth, write_outputs)
from vtc.testing import save_tiny_llava

# ----------------------------------------------------------------------------- the summary, worked by hand

# A model small enough to count its FLOPs by hand: width 1 everywhere, 2x2 patches (4 image tokens), 32 LLM layers.
# Per decoder layer on n positions: projections 4n + scores/sum 2n^2 + gated MLP 3n = 7n + 2n^2 multiply-adds.
# Vision: 5 positions; embed 4 x 3 = 12; layer 4*5 + 2*25 + 2*5 = 80 -> 2 x 92 = 184 FLOPs. Projector: 4 per token.
UNIT = Shape(vision_width=1, vision_mlp=1, vision_layers=1, patch_size=1, image_size=2, llm_width=1, llm_mlp=1,
             llm_layers=FULL_DEPTH, heads=1, kv_heads=1, vocab=1)
TEXT = 2


def sample(tower=float("nan"), signals=12.0, select=0.0, project=1.0, prefill=30.0, layers=(5, 5, 5, 5), decode=3.0,
           decode_layers=(0.5, 0.5, 0.5, 0.5), tokens=4.0, kv=100, peak=200) -> Sample:
    return Sample(tower, signals, select, project, prefill, list(layers), decode, list(decode_layers), kv, peak, tokens)


def hand_rows() -> list[Row]:
    full = Row("none", "auto", [
        # prefill at 32 layers: (30 - 20 outside the layers) + 5 x 32 = 170; e2e = 12 + 0 + 1 + 170 = 183
        sample(tower=10.04, signals=12.0),
        sample(tower=14.0, signals=16.0),  # e2e 187
        sample(tower=9.0, signals=11.0),  # e2e 182
    ])  # medians: stock tower 10.04, e2e 183, spread 187 - 182 = 5
    pool = Row("pool", "2", [
        # unequal layers (mean 2): (12 - 8) + 2 x 32 = 68; e2e = 13 + 0.5 + 0.5 + 68 = 82
        sample(signals=13.0, select=0.5, project=0.5, prefill=12.0, layers=(1, 2, 3, 2), decode=2.0,
               decode_layers=(0.25, 0.5, 0.5, 0.25), tokens=2.0),
    ])
    # FastV-like: one stage at layer 2 keeping 1 token; built layer 0 stands for layers 0-1, built layers 1-3 for 2-31.
    # prefill: (20 - 11) + 2 x 5 + 30 x mean(1, 2, 3) = 9 + 10 + 60 = 79; e2e = 12 + 0 + 1 + 79 = 92
    fastv = Row("fastv", "1", [sample(prefill=20.0, layers=(5, 1, 2, 3), decode=3.0, decode_layers=(0.5, 0.2, 0.4, 0.6), tokens=38 / 32)],
                stages=[(2, 1)])
    # two stages (layer 8 keeps 2, layer 16 keeps 1): 8 x 4 + 8 x 2 + 16 x mean(1, 3) = 80, + (20 - 10) = 90; e2e 103
    pdrop = Row("pyramiddrop", "2", [sample(prefill=20.0, layers=(4, 2, 1, 3), tokens=2.0)], stages=[(8, 2), (16, 1)])
    return [full, pool, fastv, pdrop]


def test_summary_numbers_by_hand_at_four_built_layers():
    by = {r["method"]: r for r in summarise_rows(hand_rows(), UNIT, TEXT)}
    full, pool, fastv, pdrop = by["none"], by["pool"], by["fastv"], by["pyramiddrop"]
    assert full["e2e_prefill_ms_32_layers"] == 183.0 and full["e2e_spread_ms"] == 5.0 and full["tower_ms"] == 10.0
    assert full["speedup"] == 1.0 and full["method_overhead_ms"] == 2.0  # 12 - 10.04 stock tower + 0
    # vision-side: mean of the 4 layers x 32, not one layer x 32
    assert pool["prefill_ms_32_layers"] == 68.0 and pool["e2e_prefill_ms_32_layers"] == 82.0
    assert pool["speedup"] == round(183 / 82, 3) == 2.232  # faster is > 1
    assert pool["method_overhead_ms"] == 3.5  # 13 - 10.04 (stock tower) + 0.5 selection = 3.46
    assert pool["overhead_share_of_full_prefill"] == round(3.46 / 183, 4)
    # decode per token: (2 - 1.5) outside + mean 0.375 x 32 = 12.5
    assert pool["decode_ms_per_token_32_layers"] == 12.5
    # in-LLM: each stage's own built layers, averaged, times its 32-layer depth
    assert fastv["prefill_ms_32_layers"] == 79.0 and fastv["speedup"] == round(183 / 92, 3)
    assert pdrop["prefill_ms_32_layers"] == 90.0 and pdrop["speedup"] == round(183 / 103, 3)
    # decode: 1.3 outside + 2 x 0.5 (layer 0) + 30 x mean(0.2, 0.4, 0.6); all-layer mean x 32 would give 14.9
    assert fastv["decode_ms_per_token_32_layers"] == 14.3
    assert fastv["stages"] == [(2, 1)] and pool["stages"] == []


def test_summary_reports_every_measured_field_rounded():
    full = Row("none", "auto", [sample(tower=10.34, signals=12.0)])  # e2e 183 as above, stock tower 10.34
    common = dict(select=0.416, project=1.244, prefill=30.06, decode=3.03, decode_layers=(0.25, 0.5, 0.75, 0.5), tokens=3.0)
    tome = Row("tome", "3", [sample(signals=12.34, kv=123, peak=456, **common), sample(signals=12.93, kv=125, peak=458, **common)])
    r = summarise_rows([full, tome], UNIT, TEXT)[1]
    # prefill at 32 layers: 10.06 outside + 5 x 32 = 170.06; e2e 12.34 + 0.416 + 1.244 + 170.06 = 184.06 and 184.65
    # -> median 184.355, spread 0.59; decode: 1.03 outside + 0.5 x 32 = 17.03
    # own: 12.34 - 10.34 + 0.416 = 2.416 and 3.006 -> median 2.711, share 2.711 / 183 = 0.01481; speed-up 183 / 184.355
    expected = {"tower_ms": 10.3, "signals_ms": 12.6, "select_ms": 0.42, "project_ms": 1.24, "prefill_ms_measured": 30.1,
                "prefill_ms_32_layers": 170.1, "e2e_prefill_ms_32_layers": 184.4, "e2e_spread_ms": 0.6,
                "decode_ms_per_token_32_layers": 17.0, "kv_bytes_measured": 124, "peak_prefill_bytes": 457,
                "method_overhead_ms": 2.7, "overhead_share_of_full_prefill": 0.0148, "speedup": 0.993, "tokens": 3.0}
    assert {k: r[k] for k in expected} == expected


def test_summary_flops_and_kv_by_hand():
    by = {r["method"]: r for r in summarise_rows(hand_rows(), UNIT, TEXT)}
    # full: 6 positions, layer 7*6 + 2*36 = 114; prefill 2 (32 x 114 + 1 head) = 7298; + 184 vision + 16 projector = 7498
    # pool, 2 image tokens: 4 positions, layer 60; 2 (32 x 60 + 1) = 3842; + 184 + 8 = 4034
    # fastv: 2 layers x 114 + 30 layers x (3 positions: 39) = 1398; 2 (1398 + 1) + 184 + 16 (4 tokens projected) = 2998
    # pyramiddrop: 8 x 114 + 8 x 60 + 16 x 39 = 2016; 2 (2016 + 1) + 200 = 4234
    assert by["none"]["flops_ratio"] == 1.0
    assert by["pool"]["flops_ratio"] == round(7498 / 4034, 3)
    assert by["fastv"]["flops_ratio"] == round(7498 / 2998, 3)
    assert by["pyramiddrop"]["flops_ratio"] == round(7498 / 4234, 3)
    assert by["pool"]["speedup_vs_flops"] == round((183 / 82) / (7498 / 4034), 3)
    # KV fp16: 2 (k, v) x positions x width 1 x 2 bytes per layer
    assert by["none"]["kv_bytes_32_layers_fp16"] == 32 * 2 * 6 * 2
    assert by["pool"]["kv_bytes_32_layers_fp16"] == 32 * 2 * 4 * 2
    assert by["fastv"]["kv_bytes_32_layers_fp16"] == (2 * 6 + 30 * 3) * 2 * 2
    assert by["pool"]["tokens"] == 2.0 and by["fastv"]["tokens"] == 38 / 32


def test_summary_takes_medians_and_needs_the_full_row_first():
    rows = hand_rows()
    pool = rows[1]
    slow = sample(signals=40.0, select=0.5, project=0.5, prefill=12.0, layers=(1, 2, 3, 2), tokens=2.0)  # e2e 109
    fast = sample(signals=11.03, select=0.5, project=0.5, prefill=12.0, layers=(1, 2, 3, 2), tokens=2.0, kv=300, peak=50)  # e2e 80.03
    pool.samples += [slow, fast]
    [r] = [r for r in summarise_rows(rows, UNIT, TEXT) if r["method"] == "pool"]
    assert r["e2e_prefill_ms_32_layers"] == 82.0 and r["e2e_spread_ms"] == 29.0 and r["method_overhead_ms"] == 3.5  # spread 28.97
    assert r["kv_bytes_measured"] == 100 and r["peak_prefill_bytes"] == 200  # medians of (100, 100, 300) and (200, 200, 50)
    with pytest.raises(VTCError, match="'none'"):
        summarise_rows(rows[1:], UNIT, TEXT)


def test_summary_gpu_estimate_and_selection_share_by_hand():
    rows = hand_rows()
    rows[1].select_ms_per_image = {1: 403.4, 16: 40.3449, 64: 4.034}
    # 1e-9 TFLOP/s at 100%: one FLOP per millisecond, so each GPU figure is the hand-counted FLOPs above
    by = {r["method"]: r for r in summarise_rows(rows, UNIT, TEXT, tflops=1e-9, utilisation=1.0)}
    pool, fastv = by["pool"], by["fastv"]
    # pool, 2 image tokens: vision 184 + projector 8 + LLM 3842 = 4034; full tokens 7498
    assert (pool["gpu_vision_ms"], pool["gpu_llm_prefill_ms"], pool["gpu_prefill_ms"], pool["gpu_prefill_ms_full"]) == (184, 3850, 4034, 7498)
    assert pool["select_ms_per_image"] == {"1": 403.4, "16": 40.345, "64": 4.034}  # rounded to the microsecond
    assert pool["select_share_of_gpu_prefill"] == {"1": 0.1, "16": 0.01, "64": 0.001}  # of this row's 4034, not 7498
    # in-LLM: the staged prefill (2998 as above); no selection of its own timed
    assert fastv["gpu_prefill_ms"] == 2998 and fastv["gpu_prefill_ms_full"] == 7498
    assert fastv["select_ms_per_image"] == {} and fastv["select_share_of_gpu_prefill"] == {}
    assert by["none"]["gpu_prefill_ms"] == 7498 and by["pyramiddrop"]["gpu_prefill_ms"] == 4234


def test_summary_tower_and_llm_apart_by_hand():
    by = {r["method"]: r for r in summarise_rows(hand_rows(), UNIT, TEXT)}
    full, pool, fastv = by["none"], by["pool"], by["fastv"]
    # tower side = our tower run + selection; LLM side = projector + 32-layer prefill (medians over the samples)
    # full: towers 12, 16, 11 -> 12; LLM 1 + 170 = 171 in each; pool: 13 + 0.5 and 0.5 + 68; fastv: 12 and 1 + 79
    assert (full["tower_side_ms"], full["llm_side_ms"]) == (12.0, 171.0)
    assert (pool["tower_side_ms"], pool["llm_side_ms"], fastv["llm_side_ms"]) == (13.5, 68.5, 80.0)
    assert pool["tower_share"] == round(13.5 / 82, 4) and full["tower_share"] == round(12 / 183, 4)
    assert pool["llm_speedup"] == round(171 / 68.5, 3) == 2.496 and fastv["llm_speedup"] == round(171 / 80, 3)
    # LLM FLOPs: projector + prefill (the totals of test_summary_flops_and_kv_by_hand without the 184 of the tower):
    # full 16 + 7298 = 7314, pool 8 + 3842 = 3850, fastv 16 + 2798 = 2814
    assert pool["llm_flops_ratio"] == round(7314 / 3850, 3) and fastv["llm_flops_ratio"] == round(7314 / 2814, 3)


# ----------------------------------------------------------------------------- the selection alone

SMALL = Shape(vision_width=32, vision_mlp=64, vision_layers=2, patch_size=2, image_size=8, llm_width=48, llm_mlp=96,
              llm_layers=2, heads=4, kv_heads=4, vocab=100, vision_heads=4)  # 4 x 4 = 16 patches


def test_random_signals_have_the_real_shape_and_only_what_the_method_reads():
    zip_ = random_signals(get("visionzip"), SMALL, batch=3)  # features, CLS attention and state, head-averaged keys
    assert zip_.features.shape == (3, 16, 32) and zip_.grid == (4, 4) and zip_.cls_attn.shape == (3, 16)
    assert zip_.cls_feature.shape == (3, 32)
    assert zip_.keys.shape == (3, 16, 8)  # 32 wide over 4 heads
    assert zip_.cls_attn.sum(-1).allclose(torch.ones(3)) and (zip_.cls_attn > 0).all()
    assert zip_.text_sim is None and zip_.projected is None and zip_.received_attn is None
    rec = random_signals(get("recoverable"), SMALL, batch=2)
    assert rec.keys.shape == (2, 16, 32) and rec.text_sim.shape == (2, 16) and rec.projected is None and rec.cls_feature is None
    div = random_signals(get("divprune"), SMALL, batch=1)
    assert div.projected.shape == (1, 16, 48) and div.keys is None and div.cls_attn is None


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Scripted(Method):
    """Keeps the first k patches; each call moves the fake clock by its next duration (ms per image) x the batch."""

    name = "scripted"
    needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN})

    def __init__(self, clock, durations):
        self.clock, self.durations, self.calls, self.threads = clock, list(durations), [], []

    def select_batch(self, signals, budget):
        self.calls.append(signals.batch_size)
        self.threads.append(torch.get_num_threads())
        self.clock.now += self.durations.pop(0) * signals.batch_size / 1e3
        kept = torch.arange(budget.tokens(signals.num_patches)).expand(signals.batch_size, -1)
        return Selection.from_kept(signals.features, kept)


def test_selection_time_is_the_median_per_image_after_a_warm_up(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=clock))
    # batch 1: warm-up 100 (not timed), then 5, 1, 3 -> median 3; batch 4: warm-up 100, then 2, 8, 4 -> 4 per image
    method = _Scripted(clock, [100, 5, 1, 3, 100, 2, 8, 4])
    timing = selection_ms_per_image(method, 5, SMALL, batches=(1, 4), reps=3)
    assert method.calls == [1, 1, 1, 1, 4, 4, 4, 4]
    assert timing.ms_per_image == {1: pytest.approx(3.0), 4: pytest.approx(4.0)} and timing.tokens == 5.0


def test_selection_is_timed_on_one_thread_and_the_callers_setting_comes_back(monkeypatch):
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=_Clock()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        method = _Scripted(speed.time.perf_counter, [1, 1, 1])
        selection_ms_per_image(method, 5, SMALL, batches=(2,), reps=2)
        assert method.threads == [1, 1, 1] and torch.get_num_threads() == 2
        method = _Scripted(speed.time.perf_counter, [1, 1])
        selection_ms_per_image(method, 5, SMALL, batches=(2,), reps=1, threads=None)  # None: left as it is
        assert method.threads == [2, 2]
    finally:
        torch.set_num_threads(before)


def test_selection_timing_reports_the_tokens_an_auto_budget_chose_and_refuses_what_has_no_selection():
    timing = selection_ms_per_image(get("prumerge"), "auto", SMALL, batches=(2,), reps=1)
    chosen = [sel.num_tokens for sel in get("prumerge").select(random_signals(get("prumerge"), SMALL, 2), "auto")]
    assert timing.tokens == sum(chosen) / 2 and list(timing.ms_per_image) == [2] and timing.ms_per_image[2] > 0
    for name in ("none", "downsample", "fastv"):
        with pytest.raises(VTCError, match="no selection of its own"):
            selection_ms_per_image(get(name), 4, SMALL)
    with pytest.raises(VTCError, match="batch sizes >= 1"):
        selection_ms_per_image(get("fastervlm"), 4, SMALL, batches=(0,))


def test_extrapolation_scales_only_the_decoder_layers():
    # 10 ms measured, 6 of them in 2 layers: 4 ms outside + 3 ms per layer x 32
    assert to_full_depth(10.0, [2.0, 4.0]) == pytest.approx(4.0 + 3.0 * FULL_DEPTH)
    # in-LLM, one stage at layer 2 of 32: built layer 0 stands for 2 layers, built layer 1 for 30
    assert to_full_depth(10.0, [4.0, 2.0], [2, 30]) == pytest.approx(4.0 + 2 * 4.0 + 30 * 2.0)
    # three stages on 4 built layers: the last stage's two built layers are averaged
    assert to_full_depth(20.0, [4.0, 2.0, 1.0, 3.0], [8, 8, 16]) == pytest.approx(10.0 + 8 * 4 + 8 * 2 + 16 * 2)
    assert Row("x", "1", stages=[(8, 2), (16, 1)]).stage_depths() == [8, 8, 16] and Row("x", "1").stage_depths() is None


# ----------------------------------------------------------------------------- a real run on a tiny LLaVA


@pytest.fixture(scope="module")
def bench(tiny_dirs, tmp_path_factory):
    # 4 decoder layers, as `vtc speed` builds by default
    path = save_tiny_llava(tmp_path_factory.mktemp("speed") / "llava4", text_layers=4)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    return SpeedBench(text_tokens=6, decode_tokens=2, model=model, text_scorer=ClipTextScorer.from_pretrained(tiny_dirs[1]))


def test_speed_rows_measure_what_they_claim(bench, tmp_path):
    assert bench.llm_layers == 4
    _, results = run_speed(["fastervlm", "recoverable", "downsample"], ["4", "auto"], 4, 2, 6, 2, bench=bench, select_batches=(1, 4))
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
    # the selection alone, per image at each batch size, for methods that have one; the GPU estimate for every row
    assert set(pruned["select_ms_per_image"]) == set(by[("recoverable", "auto")]["select_ms_per_image"]) == {"1", "4"}
    assert all(ms > 0 for ms in pruned["select_ms_per_image"].values())
    assert full["select_ms_per_image"] == by[("downsample", "4")]["select_ms_per_image"] == {}
    assert all(r["gpu_prefill_ms_full"] == full["gpu_prefill_ms"] for r in results)
    assert {"gpu_vision_ms", "gpu_llm_prefill_ms", "gpu_prefill_ms"} <= set(pruned)  # a tiny model's round to 0 ms (numbers: by hand above)
    assert all(r["e2e_prefill_ms_32_layers"] > 0 and r["speedup"] > 0 for r in results)
    # the 32-layer prefill extrapolates the measured one: 4 built layers stand for 32
    assert all(r["prefill_ms_32_layers"] > r["prefill_ms_measured"] for r in results)
    write_outputs(results, {"llm_layers_built": 4}, tmp_path)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and (tmp_path / "speed.png").stat().st_size > 10_000


def test_in_llm_methods_are_timed_by_stage(bench):
    from vtc.cost import request_cost, staged_cost

    _, results = run_speed(["fastv", "pyramiddrop"], ["8"], 4, 1, 6, 2, bench=bench)
    by = {r["method"]: r for r in results}
    fastv = by["fastv"]
    assert fastv["stages"] and abs(fastv["tokens"] - 8) <= 0.5  # the budget is the 32-layer average
    (layer, keep), = fastv["stages"]
    assert layer == 2 and (2 * 16 + 30 * keep) / 32 == pytest.approx(fastv["tokens"])
    full = request_cost(bench.shape, 16, 6)["total_prefill_flops"]
    assert fastv["flops_ratio"] == round(full / staged_cost(bench.shape, 16, fastv["stages"], 6)["total_prefill_flops"], 3)
    assert len(by["pyramiddrop"]["stages"]) == 3  # three stages replayed on built layers 1-3


def test_in_llm_method_with_more_stages_than_built_layers_is_refused(tiny_dirs):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0]).eval()  # 2 decoder layers
    bench = SpeedBench(text_tokens=6, decode_tokens=1, model=model, text_scorer=ClipTextScorer.from_pretrained(tiny_dirs[1]))
    timed = []
    bench.run_once = lambda *args, **kwargs: timed.append(args)  # refused while planning, before any timed run
    with pytest.raises(VTCError, match="build at least 4 decoder layers"):
        run_speed(["fastv", "pyramiddrop"], ["8"], 2, 1, 6, 1, bench=bench)
    assert timed == []


def test_speed_command_prints_the_selection_table_and_saves_it(tiny_dirs, tmp_path, monkeypatch):
    from vtc.cli import app

    tiny = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0]).eval()
    scorer = ClipTextScorer.from_pretrained(tiny_dirs[1])
    real = speed.SpeedBench
    monkeypatch.setattr(speed, "SpeedBench", lambda layers, text, decode, **kw: real(layers, text, decode, model=tiny, text_scorer=scorer, **kw))
    result = CliRunner().invoke(app, ["speed", "--methods", "fastervlm,pool", "--budgets", "4", "--llm-layers", "2", "--reps", "1",
                                      "--text-tokens", "6", "--decode-tokens", "1", "--select-batches", "1,3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["meta"]["select_batches"] == [1, 3] and "A100" in saved["meta"]["gpu_estimate"]
    by = {r["method"]: r for r in saved["results"]}
    assert set(by["fastervlm"]["select_ms_per_image"]) == set(by["pool"]["select_share_of_gpu_prefill"]) == {"1", "3"}
    text = " ".join(result.output.split())
    assert "Selection alone, ms per image" in text and "A100 bf16" in text and "b=3" in text and "% GPU" in text


# ----------------------------------------------------------------------------- other model shapes


def test_llava_next_7b_bench_image_has_the_processors_token_count():
    """The 672x672 image `vtc speed --shape llava-next-7b` times: the adapter's count is what LlavaNextProcessor
    (built from the shape's config, no download) writes for it, 576 base + 48 rows x (48 + 1 newline)."""
    import numpy as np
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    from vtc.models.llava_next import LlavaNextAdapter
    from vtc.shapes import NEXT_IMAGE, llava_next_config
    from vtc.testing import word_tokenizer

    config = llava_next_config(1)
    tokenizer = word_tokenizer()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                   image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    inputs = processor(images=[Image.fromarray(np.zeros((*NEXT_IMAGE, 3), np.uint8))], text=["<image> hi"], return_tensors="pt")
    written = int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
    with torch.device("meta"):
        adapter = LlavaNextAdapter(LlavaNextForConditionalGeneration(config))
    layout = adapter.layout(NEXT_IMAGE)
    assert written == adapter.tokens_before(inputs)[0] == 576 + 48 * 49 == 2928
    assert (layout.crops, tuple(layout.canvas.shape), layout.num_candidates) == (5, (48, 48), 2880)
    assert inputs["pixel_values"].shape[1] == layout.crops


@pytest.fixture(scope="module")
def next_bench(tiny_dirs, tmp_path_factory):
    from transformers import LlavaNextForConditionalGeneration

    from vtc.testing import save_tiny_llava_next

    path = save_tiny_llava_next(tmp_path_factory.mktemp("speed") / "next")  # 2 decoder layers, 32 px crops of 4x4 patches
    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    return SpeedBench(text_tokens=6, decode_tokens=2, model=model, text_scorer=ClipTextScorer.from_pretrained(tiny_dirs[1]))


def test_next_bench_times_the_tiled_image_through_the_adapter(next_bench):
    bench = next_bench
    # a 64x64 image on 32 px crops: base + 2x2 tiles; 16 base patches + an 8x8 canvas, 8 newline rows
    assert bench.inputs["pixel_values"].shape[:2] == (1, 5) and bench.image_tokens == 16 + 8 * 9 == 88
    assert (bench.shape.crops, bench.shape.num_candidates, bench.shape.candidate_grid) == (5, 80, (1, 80))
    _, results = run_speed(["fastervlm", "downsample", "fastv"], ["0.1"], 2, 1, 6, 2, bench=bench, select_batches=(1,))
    by = {r["method"]: r for r in results}
    assert "downsample" not in by and any("downsample" in note and "tiles" in note for note in bench.skipped)
    cfg = bench.model.config.text_config
    kv_width = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    full, kept = by["none"], by["fastervlm"]
    # what the LLM saw, read from its KV cache: 10% of 80 candidates (8) plus the newline rows they kept
    assert full["tokens"] == 88 and full["newline_tokens"] == 8
    assert kept["tokens"] - kept["newline_tokens"] == 8 and 1 <= kept["newline_tokens"] <= 8
    for r in (full, kept):
        assert r["kv_bytes_measured"] == 2 * 2 * (r["tokens"] + 6) * kv_width * 4
    # FLOPs: 5 crops through the tower for every row; the projector on patch tokens, not newlines
    full_cost = request_cost(bench.shape, 88, 6, projected_tokens=80)
    kept_cost = request_cost(bench.shape, int(kept["tokens"]), 6, projected_tokens=8)
    assert kept["flops_ratio"] == round(full_cost["total_prefill_flops"] / kept_cost["total_prefill_flops"], 3)
    assert kept_cost["vision_flops"] == 5 * request_cost(replace(bench.shape, crops=1, canvas=(0, 0)), 16, 6)["vision_flops"]
    # in-LLM: its plan over all 88 image tokens, newlines included
    (layer, keep), = by["fastv"]["stages"]
    assert layer == 2 and (2 * 88 + 30 * keep) / 32 == pytest.approx(by["fastv"]["tokens"])
    assert set(kept["select_ms_per_image"]) == {"1"}


def test_newline_rows_count_the_canvas_rows_a_selection_keeps(next_bench):
    from vtc.speed import newline_rows

    bench = next_bench
    inputs = bench.inputs
    for name, budget in (("fastervlm", "0.1"), ("divprune", "20"), ("visionzip", "12"), ("pool", "0.25")):
        method = get(name)
        [selection], _ = bench.adapter.compress(inputs, method, Budget.parse(budget), None)
        bench.adapter.project([selection])  # arranges the tokens and counts the newlines it wrote
        assert newline_rows(selection, bench.shape) == selection.info["newline_tokens"], name
    # by hand on a 2x2 base + 2x3 canvas: kept base 1, canvas cells 4 + 0 (row 0) and 4 + 5 (row 1): one row is 1, 2
    shape = replace(UNIT, image_size=2, crops=3, canvas=(2, 3))
    kept = Selection.from_kept(torch.zeros(1, 10, 1), torch.tensor([[1, 4, 9]]))
    assert newline_rows(kept[0], shape) == 2
    assert newline_rows(Selection.from_kept(torch.zeros(1, 10, 1), torch.tensor([[0, 1, 2]]))[0], shape) == 0
    assert newline_rows(kept[0], UNIT) == 0  # one grid: no newlines


def test_random_signals_of_a_tiled_shape_rank_every_candidate_together():
    tiled = replace(SMALL, crops=5, canvas=(8, 8))  # 16 base + 64 canvas candidates
    signals = random_signals(get("fastervlm"), tiled, batch=2)
    assert signals.features.shape == (2, 80, 32) and signals.grid == (1, 80) and signals.cls_attn.shape == (2, 80)


def test_shapes_are_refused_by_name_and_depth_is_the_shapes_own():
    from vtc.speed import full_depth

    # checked first: with a wrong depth the refusals below would build a 7B model instead of refusing
    assert (full_depth("llava-1.5-7b"), full_depth("llava-next-7b"), full_depth("llava-onevision-7b")) == (32, 32, 28)
    with pytest.raises(VTCError, match="llava-next-7b"):
        SpeedBench(shape="llava-2")
    with pytest.raises(VTCError, match="between 1 and 32"):
        SpeedBench(llm_layers=33, shape="llava-next-7b")
    with pytest.raises(VTCError, match="between 1 and 28"):  # Qwen2-7B
        SpeedBench(llm_layers=29, shape="llava-onevision-7b")


def test_model_cost_shape_reads_each_familys_layout_without_weights():
    """The no-model shapes equal the counts worked out elsewhere: LlavaNextProcessor's 2928 for a 672x672 image
    (the test above) and LlavaOnevisionProcessor's 3699 (tests/test_cost.py), and one 576-token grid for LLaVA-1.5."""
    from vtc.shapes import onevision_shape
    from vtc.speed import model_cost_shape

    one, nxt, ov = (model_cost_shape(n) for n in ("llava-1.5-7b", "llava-next-7b", "llava-onevision-7b"))
    assert (one.image_tokens, one.crops, one.llm_layers, one.cls_tokens) == (576, 1, 32, 1)
    assert (nxt.image_tokens, nxt.crops, nxt.canvas, nxt.llm_layers) == (2928, 5, (48, 48), 32)
    assert ov == onevision_shape() and (ov.image_tokens, ov.llm_layers, ov.cls_tokens) == (3699, 28, 0)


@pytest.fixture(scope="module")
def onevision_bench(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    from vtc.testing import save_tiny_llava_onevision

    path = save_tiny_llava_onevision(tmp_path_factory.mktemp("speed") / "ov")  # SigLIP, Qwen2 (2 layers), 32 px crops
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    return SpeedBench(text_tokens=6, decode_tokens=2, model=model, shape="llava-onevision-7b")


def test_onevision_bench_times_the_tiled_image_with_the_language_models_text_score(onevision_bench):
    from vtc.models.embed_text import EmbeddingTextScorer

    bench = onevision_bench
    # no CLS token: 16 base patches + an 8x8 canvas + 8 newline rows; SigLIP gets the embedding text source
    assert bench.image_tokens == 16 + 64 + 8 and bench.shape.cls_tokens == 0 and bench.depth == 28
    assert isinstance(bench.adapter.text_scorer, EmbeddingTextScorer)
    _, results = run_speed(["fastervlm", "recoverable", "fastv"], ["0.1"], 2, 1, 6, 2, bench=bench, select_batches=(1,))
    by = {r["method"]: r for r in results}
    cfg = bench.model.config.text_config
    kv_width = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    for name in ("fastervlm", "recoverable"):
        r = by[name]
        assert r["tokens"] - r["newline_tokens"] == 8 and r["kv_bytes_measured"] == 2 * 2 * (r["tokens"] + 6) * kv_width * 4
    # prefill extrapolated to Qwen2-7B's 28 layers: measured - measured layers + 28 x the mean layer
    s = bench.run_once(get("fastervlm"), Budget.parse("0.1"))
    assert to_full_depth(s.prefill_ms, s.layers_ms, depth=28) == pytest.approx(s.prefill_ms - sum(s.layers_ms) + 14 * sum(s.layers_ms))
    (layer, keep), = by["fastv"]["stages"]
    assert layer == 2 and (2 * 88 + 26 * keep) / 28 == pytest.approx(by["fastv"]["tokens"])


def test_speed_command_tables_for_next_and_onevision(next_bench, tiny_dirs, tmp_path, monkeypatch):
    from vtc.cli import app

    real = speed.SpeedBench
    monkeypatch.setattr(speed, "SpeedBench", lambda layers, text, decode, **kw: real(
        layers, text, decode, model=next_bench.model, text_scorer=ClipTextScorer.from_pretrained(tiny_dirs[1]), **kw))
    args = ["speed", "--methods", "fastervlm", "--budgets", "10%", "--llm-layers", "2", "--reps", "1", "--text-tokens", "6",
            "--decode-tokens", "1", "--select-batches", "1"]
    result = CliRunner().invoke(app, args + ["--shape", "llava-next-7b", "--out", str(tmp_path / "next")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "LLaVA-NeXT-7B shape, a 64x64 image: 88 image tokens" in text and "fastervlm 0.1" in text and "none auto 88" in text
    meta = json.loads((tmp_path / "next" / "speed.json").read_text())["meta"]
    assert (meta["shape"], meta["image_tokens"], meta["candidates"]) == ("llava-next-7b", 88, 80)
    # --cost-only: no model, the FLOPs table and the selection alone on OneVision's 3645 candidates
    result = CliRunner().invoke(app, args + ["--shape", "llava-onevision-7b", "--cost-only", "--methods", "fastervlm,fastv", "--out", str(tmp_path / "ov")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "LLaVA-OneVision-7B shape, a 672x672 image: 3699 image tokens" in text and "no model built" in text
    rows = {r["method"]: r for r in json.loads((tmp_path / "ov" / "speed.json").read_text())["results"]}
    assert rows["none"]["tokens"] == 3699 and rows["fastervlm"]["tokens"] == 364 + rows["fastervlm"]["newline_tokens"]
    assert rows["fastervlm"]["flops_ratio"] > 5 and set(rows["fastervlm"]["select_ms_per_image"]) == {"1"}
    assert rows["fastv"]["stages"] and rows["fastv"]["select_ms_per_image"] == {}
    result = CliRunner().invoke(app, args + ["--cost-only", "--out", str(tmp_path / "one")])  # LLaVA-1.5: one grid
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads((tmp_path / "one" / "speed.json").read_text())["results"]}
    assert rows["none"]["tokens"] == 576 and rows["fastervlm"]["tokens"] == 58 and rows["fastervlm"]["newline_tokens"] == 0
    result = CliRunner().invoke(app, args + ["--shape", "llava-9", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "llava-onevision-7b" in " ".join(result.output.split())


_FAULTS_SCRIPT = """
import resource, sys, torch
from vtc.speed import reuse_freed_memory
if sys.argv[1] == "reuse" and not reuse_freed_memory():
    raise SystemExit("no glibc")
def faults_of_a_fresh_fill():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 1024 * 1024)  # 64 MB, freed at once: over glibc's largest default mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_fill()
print(min(faults_of_a_fresh_fill() for _ in range(4)))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt and minor-fault counts are Linux's")
def test_reuse_freed_memory_stops_large_temporaries_page_faulting():
    """A 64 MB temporary made and freed again and again: with glibc's defaults each one is fresh memory
    (one minor fault per 4 KB page, 16384); after reuse_freed_memory the freed block is reused."""
    def faults(mode):
        run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.strip())

    assert faults("default") > 10_000
    assert faults("reuse") < 1_000


def test_flops_curve_runs_from_a_twentieth_of_the_tokens_to_all_and_falls_with_them():
    from vtc.speed import flops_curve, model_cost_shape

    shape = model_cost_shape("llava-1.5-7b")
    curve = flops_curve(shape, 64)
    tokens = [t for t, _ in curve]
    ratios = [r for _, r in curve]
    assert tokens[0] == 576 // 20 and tokens[-1] == 576 and tokens == sorted(set(tokens))
    assert ratios[-1] == 1.0 and all(a > b for a, b in zip(ratios, ratios[1:]))
    # the prefill FLOPs are affine in the tokens (plus a small attention term): 1 / ratio is nearly a line
    inv = [1 / r for r in ratios]
    slope = (inv[-1] - inv[0]) / (tokens[-1] - tokens[0])
    assert all(abs(inv[0] + slope * (t - tokens[0]) - v) < 0.01 for t, v in zip(tokens, inv))


def test_in_tower_methods_are_charged_the_tower_they_run(bench):
    """ToMe inside the tower and FlowCut: timed end to end (no selection alone), their FLOPs ratio counting the smaller
    tower from the per-layer token counts the adapter reports; --cost-only skips them with the reason."""
    from vtc.cost import request_cost

    _, results = run_speed(["tome_tower", "flowcut"], ["5"], 4, 1, 6, 2, bench=bench)
    by = {r["method"]: r for r in results}
    full = request_cost(bench.shape, 16, 6)["total_prefill_flops"]
    for name in ("tome_tower", "flowcut"):
        row = by[name]
        selections, _ = bench.adapter.compress(bench.inputs, get(name), Budget.parse(5), None)
        counts = selections[0].info["tower_layer_tokens"]
        assert len(counts) == bench.adapter.feature_index and counts[0][0] == 17 and min(counts[-1]) < 17
        assert row["tokens"] == 5 and row["select_ms_per_image"] == {}
        shrunk = request_cost(bench.shape, 5, 6, tower_layer_tokens=counts)["total_prefill_flops"]
        assert row["flops_ratio"] == round(full / shrunk, 3)
        assert row["flops_ratio"] > round(full / request_cost(bench.shape, 5, 6)["total_prefill_flops"], 3)
    rows, skipped = speed.cost_rows(["tome_tower"], ["5"], bench.shape, 6, select_batches=(1,), reps=1)
    assert [r["method"] for r in rows] == ["none"] and "time it without --cost-only" in skipped[0]
