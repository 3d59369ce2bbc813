"""LLaVA-OneVision (SigLIP tiles, Qwen2 decoder) on a tiny random model saved and loaded back."""

import pytest
import torch
from conftest import random_image
from test_in_llm import LLM_OPTIONS
from test_llava_next import (
    KeepAboveMean,
    check_batch_equals_single_runs,
    check_none_is_stock_generate,
    check_pruning_equals_masking,
    check_runs_or_refuses,
    stock_text,
)

from vtc.methods import Budget, Selection, Signal, VTCError, get
from vtc.methods.base import available
from vtc.models.llava_onevision import ImageOnlyOnevisionProcessor, LlavaOnevisionAdapter
from vtc.testing import save_tiny_llava_onevision

QUESTIONS = ["what is the color ?", "how many circle ?", "describe the picture .", "what is there ?", "is it red ?"]
SHRUNK = (96, 128)  # 3x4 tiles: 12x16 patches, over anyres_max_9's limit for 4x4-patch tiles: shrunk to 10x13
# (height, width): 2x2, 3x3 (unpadded), 2x2, 1x3 and a shrunk 3x4 tile canvas, so N differs per image
SIZES = [(40, 52), (90, 30), (64, 64), (20, 95), SHRUNK]


@pytest.fixture(scope="module")
def ov_path(tmp_path_factory):
    return save_tiny_llava_onevision(tmp_path_factory.mktemp("ov") / "llava_onevision", text_layers=4)


@pytest.fixture(scope="module")
def ov_pipe(ov_path):
    from vtc.pipeline import Pipeline

    return Pipeline.from_pretrained(ov_path)


@pytest.fixture
def ov_images():
    return [random_image(i + 1, size) for i, size in enumerate(SIZES)]


def test_adapter_and_processor_come_from_the_checkpoint(ov_pipe):
    from transformers import Qwen2Model

    assert isinstance(ov_pipe.adapter, LlavaOnevisionAdapter)
    assert isinstance(ov_pipe.adapter.language_model, Qwen2Model)
    processor = ov_pipe.processor
    assert isinstance(processor, ImageOnlyOnevisionProcessor) and not hasattr(processor, "video_processor")
    assert (processor.num_image_tokens, processor.vision_feature_select_strategy, processor.vision_aspect_ratio) == (
        16, "full", "anyres_max_9")
    assert processor.image_processor.image_grid_pinpoints == ov_pipe.model.config.image_grid_pinpoints


def test_none_is_token_for_token_stock_generate_single_and_padded_batch(ov_pipe, ov_images):
    check_none_is_stock_generate(ov_pipe, ov_images, QUESTIONS)


@pytest.mark.parametrize("per_tile", [False, True])
def test_pruning_equals_masking(ov_pipe, ov_images, per_tile):
    check_pruning_equals_masking(ov_pipe, ov_images, QUESTIONS, per_tile)


@pytest.mark.parametrize(
    "method,budget,per_tile",
    [(KeepAboveMean(), "auto", False), (get("recoverable", recover=False), "auto", False), ("prumerge", "auto", True),
     ("fastervlm", 12, True), ("pool", 7, False)],
)
def test_mixed_tile_batch_with_different_k_matches_single_runs(ov_pipe, ov_images, method, budget, per_tile):
    check_batch_equals_single_runs(ov_pipe, ov_images, QUESTIONS, method, budget, per_tile)


def test_cls_attention_is_the_received_attention_of_eager_siglip(ov_pipe, ov_images):
    """The CLS substitute, checked against SigLIP run eagerly with output_attentions: at the method's layer, the
    head-mean attention each patch receives, averaged over every query of its crop; and the Selection says so."""
    adapter = ov_pipe.adapter
    inputs = ov_pipe.prepare(ov_images[:2], QUESTIONS[:2])
    layouts = adapter.layouts(inputs)
    crops = adapter.crop_pixels(inputs, layouts)
    spec = get("fastervlm").attention
    ours = adapter.signals(crops, frozenset({Signal.FEATURES, Signal.CLS_ATTN}), spec)
    assert ours.received_attn is None
    tower = adapter.tower
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = tower(crops, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation(previous)
    expected = attentions[spec.layer].mean(1).mean(1)  # heads, then query rows
    torch.testing.assert_close(ours.cls_attn, expected, atol=1e-6, rtol=1e-5)
    [r] = ov_pipe(ov_images[:1], QUESTIONS[:1], method="fastervlm", budget=0.3, max_new_tokens=1)
    assert r.selection.info["cls_attn"] == "received_attn"
    [r] = ov_pipe(ov_images[:1], QUESTIONS[:1], method="pool", budget=7, max_new_tokens=1)
    assert "cls_attn" not in r.selection.info


def test_features_are_the_stock_feature_layer_of_every_token(ov_pipe, ov_images):
    """No CLS to drop ('full' strategy): the candidates' features are hidden_states[vision_feature_layer] of the
    stock tower, base crop then unpadded canvas."""
    adapter = ov_pipe.adapter
    inputs = ov_pipe.prepare(ov_images[1:2], QUESTIONS[:1])
    [layout] = adapter.layouts(inputs)
    crops = adapter.crop_pixels(inputs, [layout])
    ours = adapter.signals(crops, frozenset({Signal.FEATURES}), get("none").attention)
    with torch.no_grad():
        stock = adapter.tower(crops, output_hidden_states=True).hidden_states[ov_pipe.model.config.vision_feature_layer]
    torch.testing.assert_close(ours.features, stock)
    assert ours.features.shape[1] == adapter.num_patches


def stock_count(pipe, size, aspect):
    """Image tokens the stock model packs for an image of ``size`` under ``vision_aspect_ratio=aspect``."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel, image_size_to_num_patches

    crops = image_size_to_num_patches(list(size), pipe.model.config.image_grid_pinpoints, pipe.adapter.tile_size)
    feats = [torch.zeros(crops, pipe.adapter.num_patches, 2)]
    _, lens = LlavaOnevisionModel.pack_image_features(pipe.model.model, feats, torch.tensor([size]), torch.zeros(2), aspect)
    return int(lens[0])


def test_layout_matches_the_stock_count_and_shrinks_exactly_the_canvases_the_model_shrinks(ov_pipe):
    from vtc.models.llava_onevision import ShrunkLayout

    adapter = ov_pipe.adapter
    shrunk = []
    for size in [(40, 52), (90, 30), (20, 95), (64, 64), (30, 30), (96, 128), (80, 120), (100, 100), (33, 200), (150, 100)]:
        layout = adapter.layout(size)
        stock = stock_count(ov_pipe, size, "anyres_max_9")
        assert stock == layout.num_tokens
        assert isinstance(layout, ShrunkLayout) == (stock < stock_count(ov_pipe, size, "anyres_max_100000"))
        shrunk += [size] if isinstance(layout, ShrunkLayout) else []
        selection = Selection.build(torch.zeros(layout.num_candidates, 2), torch.arange(3))
        selection.layout = layout
        panels = adapter.map_panels(selection)
        assert torch.equal(torch.cat([index for _, index, _ in panels]), torch.arange(layout.num_candidates))
        for _, index, boxes in panels:
            assert boxes.shape == (len(index), 4) and boxes.min() >= 0 and boxes.max() <= 1
        segments = layout.segments()  # per-tile parts: rectangles that partition the candidates
        assert sorted(torch.cat([p for p, _ in segments]).tolist()) == list(range(layout.num_candidates))
        assert all(len(p) == g[0] * g[1] for p, g in segments)
    assert SHRUNK in shrunk and len(shrunk) < 10
    assert not isinstance(adapter.layout((80, 120)), ShrunkLayout), "12 tiles, unpadded under the limit: not shrunk"


@pytest.mark.parametrize("size", [SHRUNK, (150, 100), (40, 52)])
def test_candidate_signals_are_what_the_stock_packing_makes_of_them(ov_pipe, size):
    """Every per-patch signal of the candidates (base, then canvas cells, shrunk or not) equals the stock
    pack_image_features run on that signal as if it were the projected features (no newline)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    adapter = ov_pipe.adapter
    inputs = ov_pipe.prepare([random_image(5, size)], QUESTIONS[:1])
    [layout] = adapter.layouts(inputs)
    method = get("prumerge")
    flat, [first] = adapter.candidate_signals(inputs, [layout], method, None)
    crops = adapter.signals(adapter.crop_pixels(inputs, [layout]), method.needs, method.attention)
    for name in (Signal.FEATURES, Signal.CLS_ATTN, Signal.KEYS):
        ours = getattr(flat, name).flatten(0, 1)[first + layout.candidates()]
        per_crop = getattr(crops, name)
        per_crop = per_crop if per_crop.dim() == 3 else per_crop[..., None]
        [packed], _ = LlavaOnevisionModel.pack_image_features(ov_pipe.model.model, [per_crop], inputs["image_sizes"], None)
        torch.testing.assert_close(ours.reshape(packed.shape), packed, atol=1e-6, rtol=1e-5)


def test_refusals_name_what_is_missing(ov_pipe, ov_images, tiny_dirs):
    from vtc.pipeline import Pipeline

    with pytest.raises(VTCError, match="keep_cls=False"):
        ov_pipe(ov_images[:1], QUESTIONS[:1], method="visionzip", budget=0.3, max_new_tokens=1)
    [r] = ov_pipe(ov_images[:1], QUESTIONS[:1], method="visionzip", budget=0.3, max_new_tokens=1, keep_cls=False)
    assert r.selection.counts()["global"] == 0
    with pytest.raises(VTCError, match="'recoverable' needs a text-to-patch score.*language-model embedding"):
        ov_pipe(ov_images[:1], QUESTIONS[:1], method="recoverable", max_new_tokens=1)
    with_clip = Pipeline(ov_pipe.model, ov_pipe.processor, Pipeline.from_pretrained(tiny_dirs[0], clip=tiny_dirs[1]).adapter.text_scorer)
    with pytest.raises(VTCError, match="ClipTextScorer.*reads CLIP patch states"):
        with_clip(ov_images[:1], QUESTIONS[:1], method="fastervlm+text", budget=0.3, max_new_tokens=1)
    inputs = ov_pipe.prepare(ov_images[:2], QUESTIONS[:2])
    with pytest.raises(VTCError, match="one image per prompt"):
        ov_pipe.adapter.layouts({**inputs, "batch_num_images": torch.tensor([2])})


def test_unsupported_configurations_are_refused(ov_pipe):
    config = ov_pipe.model.config
    for field, value, message in [("vision_feature_select_strategy", "default", "'full' strategy"),
                                  ("vision_aspect_ratio", "anyres", "anyres_max_N")]:
        old = getattr(config, field)
        setattr(config, field, value)
        try:
            with pytest.raises(VTCError, match=message):
                LlavaOnevisionAdapter(ov_pipe.model)
        finally:
            setattr(config, field, old)


def test_in_llm_pruning_that_keeps_everything_is_stock_generate_on_qwen2(ov_pipe, ov_images):
    inputs = ov_pipe.prepare(ov_images[:2], QUESTIONS[:2])
    kept_all = ov_pipe.generate(inputs, QUESTIONS[:2], "fastv", 1.0, max_new_tokens=6, **LLM_OPTIONS["fastv"])
    assert [r.text for r in kept_all] == stock_text(ov_pipe, inputs)
    pruned = ov_pipe.generate(inputs, QUESTIONS[:2], "fastv", 0.2, max_new_tokens=2, **LLM_OPTIONS["fastv"])
    assert [r.selection.info["llm_kept"] for r in pruned] == [Budget.parse(0.2).tokens(r.tokens_before) for r in pruned]


REFUSED = {"downsample": "tiles are not supported", "visionzip": "keep_cls=False", "recoverable": "text-to-patch score",
           "cdpruner": "text-to-patch score", "vscan": "shallow .*layer .*no CLS token",
           "tome_tower": "in-tower hook is not wired for llava-onevision",
           "flowcut": "in-tower hook is not wired for llava-onevision", "visiontrim": "text-to-patch score"}


@pytest.mark.parametrize("name", available())
def test_every_method_runs_or_refuses_clearly(ov_pipe, ov_images, name):
    check_runs_or_refuses(ov_pipe, ov_images, QUESTIONS, name, REFUSED, llm_budget=0.5)  # images of 42 to 156 tokens


def test_shrunk_cells_belong_to_the_tile_under_their_centre():
    """Hand-worked: a 4x4 canvas of 2x2 tiles (crops 1..4, 4 patches each) shrunk to 3x3. Cell centres fall on
    unpadded rows/columns 0.67, 2.0, 3.33 -> 0, 2, 3, i.e. tile rows/columns 0, 1, 1 (2.0, on the border, goes
    to the later tile)."""
    from vtc.models.llava_onevision import ShrunkLayout

    y, x = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    source = 4 * (1 + (y // 2) * 2 + (x // 2)) + (y % 2) * 2 + (x % 2)  # crop * P + patch
    layout = ShrunkLayout(5, (2, 2), 20 + torch.arange(9).view(3, 3), 4, 2, source=source)
    assert layout.crop_of().tolist() == [[1, 2, 2], [3, 4, 4], [3, 4, 4]]
    assert [g for _, g in layout.segments()] == [(2, 2), (1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.parametrize("method", ["recoverable", "fastervlm+text", "cdpruner", "visiontrim"])
def test_text_guided_methods_run_with_the_llm_embedding_source(ov_path, ov_images, method):
    """OneVision has no CLIP text tower: with text_source='llm' text-guided methods run, a mixed batch equal to
    single runs (the shrunk image included)."""
    from vtc.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(ov_path, text_source="llm")
    budget = "auto" if method == "recoverable" else 0.3
    batch = pipe(ov_images, QUESTIONS[: len(ov_images)], method=method, budget=budget, max_new_tokens=3)
    singles = [pipe([i], [q], method=method, budget=budget, max_new_tokens=3)[0] for i, q in zip(ov_images, QUESTIONS)]
    assert [r.tokens_after for r in batch] == [r.tokens_after for r in singles]
    assert [r.text for r in batch] == [r.text for r in singles]
    if Signal.CLS_ATTN in get(method).needs:
        assert all(r.selection.info["cls_attn"] == "received_attn" for r in batch)
