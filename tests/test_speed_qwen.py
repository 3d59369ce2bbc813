"""`vtc speed --shape qwen2.5-vl-7b`: the 7B config, its token count against the image processor, the tower's
window attention in the cost model against torch's FLOP counter, --cost-only without weights, and the bench on a
tiny Qwen2.5-VL saved and loaded back."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from vtc import speed
from vtc.cost import Shape, attention_pairs, gpu_request_ms, projector_flops, request_cost, staged_cost, vision_flops
from vtc.methods import Budget, VTCError, get
from vtc.speed import SpeedBench, full_depth, model_cost_shape, run_speed, to_full_depth


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- the 7B shape, no weights


def test_qwen25vl_7b_config_is_the_published_checkpoints():
    """Qwen2.5-VL-7B-Instruct has 8,292,166,656 parameters (its model card: 8.29B); counted on the meta device."""
    import transformers
    from transformers.initialization import no_init_weights

    from vtc.shapes import qwen25vl_config

    config = qwen25vl_config()
    v, t = config.vision_config, config.text_config
    assert (v.num_hidden_layers, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (32, 1280, 16, 3420, 3584)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size, v.window_size) == (14, 2, 2, 112)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size, t.vocab_size) == (
        3584, 28, 28, 4, 18944, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and config.image_token_id == 151655
    with torch.device("meta"), no_init_weights():
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656


def qwen_processor(patch_size=14):
    """Qwen2VLImageProcessor (PIL backend) with the published preprocessor_config.json, and a tokenizer with
    Qwen's image tokens, so the processor writes its own <|image_pad|> count."""
    from transformers import Qwen2VLImageProcessorPil

    from vtc.models.qwen_vl import ImageOnlyQwenVLProcessor
    from vtc.testing import QWEN_CHAT_TEMPLATE, word_tokenizer

    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
    scale = (patch_size / 14) ** 2
    images = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                      min_pixels=round(3136 * scale), max_pixels=round(12845056 * scale))
    return ImageOnlyQwenVLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE), tokenizer


def written_image_tokens(processor, tokenizer, size):
    image = Image.fromarray(np.zeros((*size, 3), np.uint8))
    inputs = processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|> hi"], return_tensors="pt")
    return int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()), inputs["image_grid_thw"][0].tolist()


def test_1024_image_gives_the_processors_1369_merged_tokens():
    """1024 px is resized to 1036 (37 x 28 px): 74 x 74 patches, 37 x 37 = 1369 tokens, as the processor writes them;
    other sizes (wide, tall, small, above max_pixels) give the processor's counts too."""
    processor, tokenizer = qwen_processor()
    written, thw = written_image_tokens(processor, tokenizer, (1024, 1024))
    shape = model_cost_shape("qwen2.5-vl-7b")
    assert written == shape.image_tokens == shape.num_candidates == 37 * 37 == 1369
    assert thw == [1, 74, 74] and shape.patch_grid == (74, 74) and shape.grid == (37, 37) and shape.newlines == 0
    for size in ((480, 640), (900, 300), (60, 40), (4000, 4000)):
        written, thw = written_image_tokens(processor, tokenizer, size)
        s = model_cost_shape("qwen2.5-vl-7b", size)
        assert (s.image_tokens, list(s.patch_grid)) == (written, thw[1:]), size


def test_window_attention_pairs_follow_the_towers_own_windows():
    """At 1024 px the windows transformers' Qwen2.5-VL cuts (8 x 8 patches from the top-left, cut at the edge:
    74 = 9 x 8 + 2) hold 580 x 580 query-key pairs; the full-attention blocks 5476^2."""
    from transformers.vision_utils import get_vision_window_index

    s = model_cost_shape("qwen2.5-vl-7b")
    _, bounds = get_vision_window_index(torch.tensor([[1, 74, 74]]), spatial_merge_size=2, window_size=112, patch_size=14)
    lengths = bounds.diff().long()
    assert int((lengths**2).sum()) == attention_pairs(s, 0) == (9 * 8**2 + 2**2) ** 2 == 336_400
    assert all(attention_pairs(s, layer) == 5476**2 for layer in (7, 15, 23, 31))
    assert attention_pairs(s, 6) == attention_pairs(s, 8) == 336_400


def test_7b_tower_flops_by_hand_and_against_the_flop_counter_on_meta():
    """The real 7B tower (meta device, eager attention: the counter sees each window's matmuls) on a 252 x 308 px
    image (18 x 22 patches: edge windows both ways), and the 1024 px picture worked by hand."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.vision_utils import get_vision_position_ids

    from vtc.shapes import qwen25vl_config

    v = qwen25vl_config().vision_config
    v._attn_implementation = "eager"
    with torch.device("meta"):
        tower = Qwen2_5_VisionTransformerPretrainedModel(v).eval()
    s = model_cost_shape("qwen2.5-vl-7b", (252, 308))
    assert s.patch_grid == (18, 22)
    thw = torch.tensor([[1, 18, 22]])
    positions = get_vision_position_ids(thw, 2).to("meta")  # the rotary table would otherwise be built on the cpu
    run = lambda: tower(torch.empty(18 * 22, 1176, device="meta"), grid_thw=thw, position_ids=positions)  # noqa: E731
    assert counted(run) == vision_flops(s) + projector_flops(s, s.num_patches)
    # by hand at 1024 px, 5476 patches, multiply-adds: patch embedding 5476 x (3 x 2 x 14 x 14) x 1280;
    # per block q, k, v, o 4 x 5476 x 1280^2 + gated MLP 3 x 5476 x 1280 x 3420; attention 2 x pairs x 1280 with
    # 336,400 pairs in each of the 28 window blocks and 5476^2 in the 4 full ones
    s = model_cost_shape("qwen2.5-vl-7b")
    embed = 5476 * 1176 * 1280
    blocks = 32 * (4 * 5476 * 1280**2 + 3 * 5476 * 1280 * 3420) + 2 * 1280 * (28 * 336_400 + 4 * 5476**2)
    assert vision_flops(s) == 2 * (embed + blocks) == 7_578_211_696_640
    # merger on the 1369 tokens: 5120 x 5120 + 5120 x 3584 per token
    assert projector_flops(s, 1369) == 2 * 1369 * (5120 * 5120 + 5120 * 3584) == 122_017_546_240


def test_tiny_towers_of_both_versions_against_the_flop_counter():
    """Shape.from_config reads Qwen2.5-VL (windows, gated MLP) and Qwen2-VL (full attention, fc1/fc2 of mlp_ratio,
    embed_dim wide) configs; grids with and without edge windows."""
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                bos_token_id=1, eos_token_id=2)
    new = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, out_hidden_size=48, window_size=16,
        fullatt_block_indexes=[1, 3]))
    old = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(depth=3, embed_dim=32, hidden_size=48, mlp_ratio=2,
                                                                          num_heads=4, patch_size=4))
    torch.manual_seed(0)
    for config, tower_class in ((new, Qwen2_5_VisionTransformerPretrainedModel), (old, Qwen2VisionTransformerPretrainedModel)):
        config.vision_config._attn_implementation = "eager"
        tower = tower_class(config.vision_config).eval()
        for grid in ((8, 8), (10, 14)):
            s = Shape.from_config(config, patch_grid=grid)
            pixels = torch.randn(grid[0] * grid[1], 3 * 2 * 16)
            flops = counted(lambda: tower(pixels, grid_thw=torch.tensor([[1, *grid]])))
            assert flops == vision_flops(s) + projector_flops(s, s.num_patches), (type(tower).__name__, grid)
    with pytest.raises(ValueError, match="patch grid"):
        Shape.from_config(new)  # a native-resolution tower has no size of its own
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        Shape.from_config(new, patch_grid=(7, 8))


def test_cost_only_for_the_7b_shape_builds_no_weights(tmp_path, monkeypatch):
    """--cost-only: 1369 tokens, the tower's TFLOPs the same in every row and apart from the LLM's, VisionZip's CLS
    token refused by the Qwen adapter, FastV planned over 28 layers (a 64-token layer average is out of its reach: its
    first 2 layers alone average 2 x 1369 / 28 = 98, so it is skipped); no model is built."""
    from vtc.cli import app

    def refuse(*args, **kwargs):
        raise AssertionError("--cost-only built a model")

    monkeypatch.setitem(speed._BUILDERS, "qwen2.5-vl-7b", refuse)
    args = ["speed", "--shape", "qwen2.5-vl-7b", "--cost-only", "--methods", "fastervlm,visionzip,fastv", "--budgets", "64,10%",
            "--select-batches", "1", "--reps", "1", "--text-tokens", "64", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Qwen2.5-VL-7B shape, a 1024x1024 image: 1369 image tokens" in text and "keep_cls=False" in text
    saved = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["method"]: r for r in saved["results"] if r["budget"] != "64"}
    assert [(r["method"], r["budget"]) for r in saved["results"]][:3] == [("none", "auto"), ("fastervlm", "64"), ("fastervlm", "0.1")]
    assert set(rows) == {"none", "fastervlm", "fastv"} and any("visionzip" in note for note in saved["meta"]["skipped"])
    assert any(note.startswith("fastv@64") and "out of reach" in note for note in saved["meta"]["skipped"])
    kept = Budget.parse("10%").tokens(1369)
    assert rows["none"]["tokens"] == 1369 and rows["fastervlm"]["tokens"] == kept == 137
    shape = model_cost_shape("qwen2.5-vl-7b")
    full, pruned = request_cost(shape, 1369, 64), request_cost(shape, 137, 64)
    for name, cost in (("none", full), ("fastervlm", pruned)):
        r = rows[name]
        assert r["vision_tflops"] == round(full["vision_flops"] / 1e12, 3) == 7.578
        assert r["llm_tflops"] == round((cost["projector_flops"] + cost["prefill_flops"]) / 1e12, 3)
        assert r["gpu_vision_ms"] == round(gpu_request_ms(cost)["vision_ms"], 2)
    llm = lambda c: c["projector_flops"] + c["prefill_flops"]  # noqa: E731
    assert rows["fastervlm"]["flops_ratio"] == round(full["total_prefill_flops"] / pruned["total_prefill_flops"], 3)
    assert rows["fastervlm"]["llm_flops_ratio"] == round(llm(full) / llm(pruned), 3)
    assert rows["fastervlm"]["flops_ratio"] < 3 < rows["fastervlm"]["llm_flops_ratio"]  # the tower caps the whole
    (layer, keep), = rows["fastv"]["stages"]
    assert layer == 2 and (2 * 1369 + 26 * keep) / 28 == pytest.approx(rows["fastv"]["tokens"])
    staged = staged_cost(shape, 1369, [(layer, keep)], 64)
    assert rows["fastv"]["flops_ratio"] == round(full["total_prefill_flops"] / staged["total_prefill_flops"], 3)


def test_depth_is_28_and_bad_llm_layers_are_refused_before_building():
    from vtc.shapes import build_qwen25vl

    assert full_depth("qwen2.5-vl-7b") == 28 and model_cost_shape("qwen2.5-vl-7b").llm_layers == 28
    with torch.device("meta"):  # what `vtc speed` builds: the whole tower, the built decoder layers only
        model = build_qwen25vl(2)
    assert len(model.model.language_model.layers) == 2 and len(model.model.visual.blocks) == 32
    for layers in (29, 0):
        with pytest.raises(VTCError, match="between 1 and 28"):
            SpeedBench(llm_layers=layers, shape="qwen2.5-vl-7b")


# ----------------------------------------------------------------------------- the bench on a tiny Qwen2.5-VL


@pytest.fixture(scope="module")
def qwen_bench(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vtc.testing import save_tiny_qwen_vl

    path = save_tiny_qwen_vl(tmp_path_factory.mktemp("speed") / "qwen25", "2.5", text_layers=3)  # patches of 4 px
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    # 72 x 72 px: 18 x 18 patches, 9 x 9 merged tokens; windows of 2 x 2 tokens, the last row and column cut to 1
    return SpeedBench(text_tokens=6, decode_tokens=2, model=model, shape="qwen2.5-vl-7b", image_size=(72, 72)), path


def test_tiny_bench_image_is_what_the_saved_processor_makes(qwen_bench):
    from transformers import AutoImageProcessor

    bench, path = qwen_bench
    processed = AutoImageProcessor.from_pretrained(path, backend="pil")(images=[Image.fromarray(np.zeros((72, 72, 3), np.uint8))])
    assert bench.inputs["image_grid_thw"].tolist() == processed["image_grid_thw"].tolist() == [[1, 18, 18]]
    assert bench.inputs["pixel_values"].shape == processed["pixel_values"].shape
    assert bench.image_tokens == 81 and bench.shape.grid == (9, 9) and bench.depth == 28


def test_tiny_bench_times_none_a_vision_method_and_an_in_llm_one(qwen_bench):
    bench, _ = qwen_bench
    _, results = run_speed(["fastervlm", "visionzip", "fastv"], ["0.1"], 3, 1, 6, 2, bench=bench, select_batches=(1,))
    by = {r["method"]: r for r in results}
    assert list(by) == ["none", "fastervlm", "fastv"]  # VisionZip's CLS token: skipped with the adapter's reason
    assert any(note.startswith("visionzip@0.1") and "keep_cls=False" in note for note in bench.skipped)
    cfg = bench.model.config.text_config
    kv_width = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    assert by["none"]["tokens"] == 81 and by["fastervlm"]["tokens"] == 8  # 10% of 81
    for name in ("none", "fastervlm"):  # read from the model's own cache: 3 built layers, fp32, image + 6 text positions
        assert by[name]["kv_bytes_measured"] == 2 * 3 * (by[name]["tokens"] + 6) * kv_width * 4
    full, kept = request_cost(bench.shape, 81, 6), request_cost(bench.shape, 8, 6)
    assert by["fastervlm"]["flops_ratio"] == round(full["total_prefill_flops"] / kept["total_prefill_flops"], 3)
    assert by["fastervlm"]["llm_flops_ratio"] == round(
        (full["projector_flops"] + full["prefill_flops"]) / (kept["projector_flops"] + kept["prefill_flops"]), 3)
    # the tower runs on every patch in every row: its FLOPs do not change (tower and LLM apart: by hand in test_speed.py)
    assert by["none"]["vision_tflops"] == by["fastervlm"]["vision_tflops"] == by["fastv"]["vision_tflops"]
    assert bench.shape.window == 4 and bench.shape.full_attention_layers == (1, 3)  # 16 px windows of 4 px patches
    # in-LLM: FastV's plan over Qwen2-7B's 28 layers, replayed on the built ones
    (layer, keep), = by["fastv"]["stages"]
    assert layer == 2 and (2 * 81 + 26 * keep) / 28 == pytest.approx(by["fastv"]["tokens"])
    # the prefill extrapolated to 28 layers: measured - measured layers + 28 x the mean layer
    s = bench.run_once(get("fastervlm"), Budget.parse("0.1"))
    assert to_full_depth(s.prefill_ms, s.layers_ms, depth=28) == pytest.approx(s.prefill_ms - sum(s.layers_ms) + 28 / 3 * sum(s.layers_ms))


def test_tiny_bench_prefill_and_decode_get_the_stock_m_rope_positions(qwen_bench):
    """With all tokens, the language model sees the positions the stock forward gives the full prompt, and each
    decoded token the next one (the stock rule: the largest position + 1, + 1 per step)."""
    bench, _ = qwen_bench
    model, seen = bench.model, []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        ids = bench.inputs["input_ids"]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=bench.inputs["attention_mask"], pixel_values=bench.inputs["pixel_values"],
                  image_grid_thw=bench.inputs["image_grid_thw"], mm_token_type_ids=(ids == model.config.image_token_id).int())
        stock = seen.pop()
        bench.run_once(get("none"), Budget.parse("auto"))
    finally:
        hook.remove()
    prefill, first, second = seen
    assert torch.equal(prefill[-3:], stock[-3:])
    top = int(stock[-3:].max())
    assert first[-3:].flatten().tolist() == [top + 1] * 3 and second[-3:].flatten().tolist() == [top + 2] * 3


def test_vtc_bench_runs_on_qwen25vl_with_each_images_own_tower_cost(qwen_bench, tmp_path):
    """`vtc bench` on Qwen2.5-VL: no fixed patch count to check budgets against, and each record's FLOPs are
    charged the tower on that image's own patch grid (as the processor made it), not a fixed crop."""
    from vtc.bench.runner import BenchRunner, make_plan
    from vtc.bench.store import read_records
    from vtc.bench.tasks import load_task
    from vtc.pipeline import Pipeline

    _, path = qwen_bench
    pipe = Pipeline.from_pretrained(path)
    plan = make_plan(pipe, ["synthetic"], ["none", "fastervlm"], ["0.25"], 1)
    assert BenchRunner(pipe, tmp_path / "out", batch_size=1).run(plan) == 2
    records = {r["method"]: r for r in read_records(tmp_path / "out")}
    assert all(r["error"] is None for r in records.values()), records
    [sample] = load_task("synthetic", 1).samples
    grid = pipe.prepare([sample.load_image()], [sample.question])["image_grid_thw"][0, 1:].tolist()
    tower = vision_flops(Shape.from_config(pipe.model.config, patch_grid=tuple(grid)))
    none, kept = records["none"], records["fastervlm"]
    assert none["tokens_before"] == grid[0] * grid[1] // 4 and kept["tokens_kept"] < none["tokens_kept"]
    assert none["flops"] > kept["flops"] > tower  # the whole tower in both, the LLM on fewer tokens


def test_speed_command_prints_the_native_picture_and_the_tower_apart(qwen_bench, tmp_path, monkeypatch):
    from vtc.cli import app

    bench, _ = qwen_bench
    real = speed.SpeedBench
    monkeypatch.setattr(speed, "SpeedBench", lambda layers, text, decode, **kw: real(
        layers, text, decode, model=bench.model, image_size=(72, 72), **kw))
    args = ["speed", "--shape", "qwen2.5-vl-7b", "--methods", "fastervlm", "--budgets", "10%", "--llm-layers", "3", "--reps", "1",
            "--text-tokens", "6", "--decode-tokens", "1", "--select-batches", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Qwen2.5-VL-7B shape, a 72x72 image: 9x9 = 81 merged tokens" in text and "extrapolated to 28" in text
    assert "Vision tower and LLM apart" in text and "tower share" in text
    meta = json.loads((tmp_path / "speed.json").read_text())["meta"]
    assert (meta["shape"], meta["image_tokens"], meta["extrapolated_to_layers"]) == ("qwen2.5-vl-7b", 81, 28)
