"""Qwen2-VL and Qwen2.5-VL (merged tokens, M-RoPE) on tiny random models saved and loaded back."""

import importlib

import pytest
import torch
from conftest import random_image
from test_in_llm import LLM_OPTIONS
from test_llava_adapter import KeepAboveMean
from test_llava_next import check_batch_equals_single_runs, check_none_is_stock_generate, check_runs_or_refuses, stock_text

from vtc.methods import Budget, Origin, Selection, Signal, VTCError, get
from vtc.methods.base import available
from vtc.models.qwen_vl import ImageOnlyQwenVLProcessor, Qwen2VLAdapter, Qwen25VLAdapter, QwenGrid
from vtc.testing import save_tiny_qwen_vl

QUESTIONS = ["what is the color ?", "how many circle ?", "describe the picture .", "is it red ?"]
# (height, width) at 4-pixel patches merged 2x2: grids of 4x6, 8x5, 4x4 and 6x6 merged tokens
SIZES = [(32, 48), (64, 40), (32, 32), (48, 48)]
VERSIONS = {"2": Qwen2VLAdapter, "2.5": Qwen25VLAdapter}


@pytest.fixture(scope="module", params=list(VERSIONS))
def qwen_path(request, tmp_path_factory):
    return request.param, save_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / f"qwen{request.param}", version=request.param)


@pytest.fixture(scope="module")
def qwen_pipe(qwen_path):
    from vtc.pipeline import Pipeline

    return Pipeline.from_pretrained(qwen_path[1])


@pytest.fixture
def qwen_images():
    return [random_image(i + 1, size) for i, size in enumerate(SIZES)]


def test_adapter_and_processor_come_from_the_checkpoint(qwen_path, qwen_pipe):
    version, _ = qwen_path
    assert type(qwen_pipe.adapter) is VERSIONS[version]
    assert qwen_pipe.adapter.language_model is qwen_pipe.model.model.language_model
    processor = qwen_pipe.processor
    assert isinstance(processor, ImageOnlyQwenVLProcessor) and getattr(processor, "video_processor", None) is None


def test_none_is_token_for_token_stock_generate_single_and_padded_batch(qwen_pipe, qwen_images):
    check_none_is_stock_generate(qwen_pipe, qwen_images, QUESTIONS)


def test_kept_tokens_are_sent_as_the_stock_merger_output(qwen_pipe, qwen_images):
    """FEATURES are the merger's input groups: projecting all of them is the stock tower's pooler output, raster order."""
    inputs = qwen_pipe.prepare(qwen_images[:2], QUESTIONS[:2])
    selections, _ = qwen_pipe.compress(inputs, QUESTIONS[:2], get("none"), Budget.parse("auto"))
    ours = torch.cat(qwen_pipe.adapter.project(selections))
    with torch.no_grad():
        stock = torch.cat(qwen_pipe.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=1e-5)


def kept_rows(pipe, inputs, selection):
    """Prompt rows of the full prompt that the pruned prompt keeps: all text, and the kept image tokens."""
    ids = inputs["input_ids"][0]
    image = (ids == pipe.adapter.image_token_id).nonzero().squeeze(1)
    start, end = int(image[0]), int(image[-1]) + 1
    kept = sorted(start + int(i) for i in selection.kept_indices())
    return list(range(start)) + kept + list(range(end, ids.shape[0]))


def pruned_prompt(pipe, inputs, question, method="fastervlm", budget=0.3):
    [sel], _ = pipe.compress(inputs, [question], get(method), Budget.parse(budget))
    projected = pipe.adapter.project([sel])
    ids, mask = pipe.adapter.splice_ids(inputs["input_ids"], inputs["attention_mask"], [projected[0].shape[0]],
                                        pipe.pad_token_id, expected=pipe.adapter.tokens_before(inputs))
    return sel, projected, ids, mask


def stock_positions(pipe, inputs):
    """(3, 1, L) the stock model's own M-RoPE positions of the full prompt."""
    positions, _ = pipe.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    return positions


@pytest.mark.parametrize("b", range(len(SIZES)))
def test_pruning_equals_masking_with_stock_positions(qwen_pipe, qwen_images, b):
    """Logits of the pruned prompt equal the full model's (stock pixel path) with the dropped image tokens masked
    and every (t, h, w) position as the stock model gives it on the full prompt."""
    pipe = qwen_pipe
    inputs = pipe.prepare(qwen_images[b : b + 1], QUESTIONS[b : b + 1])
    sel, projected, ids, mask = pruned_prompt(pipe, inputs, QUESTIONS[b])
    rows = kept_rows(pipe, inputs, sel)
    assert len(rows) == ids.shape[1] and sel.num_tokens < sel.num_patches
    full_mask = torch.zeros_like(inputs["attention_mask"])
    full_mask[0, rows] = 1
    positions = stock_positions(pipe, inputs)
    ours = pipe.adapter.generation_inputs(inputs, [sel], ids, mask)["position_ids"]
    assert torch.equal(ours[1:, 0], positions[:, 0, rows])
    with torch.no_grad():
        full = pipe.model(**{**inputs, "attention_mask": full_mask}, position_ids=positions).logits
        pruned = pipe.model(input_ids=ids, attention_mask=mask, position_ids=ours[1:],
                            mm_encoder_outputs=pipe.adapter.image_inputs(projected)).logits
    torch.testing.assert_close(pruned[0], full[0, rows], atol=1e-5, rtol=1e-5)


def test_greedy_decoding_continues_as_the_masked_full_model(qwen_pipe, qwen_images):
    """8 greedy tokens after a vision-side selection equal stock generate on the full prompt with the dropped image
    tokens masked and the stock positions (each row continued by one per new token, the stock rule)."""
    pipe = qwen_pipe
    for b in (0, 1):
        inputs = pipe.prepare(qwen_images[b : b + 1], QUESTIONS[b : b + 1])
        [ours] = pipe.generate(inputs, QUESTIONS[b : b + 1], "fastervlm", 0.3, max_new_tokens=8)
        sel = ours.selection
        full_mask = torch.zeros_like(inputs["attention_mask"])
        full_mask[0, kept_rows(pipe, inputs, sel)] = 1
        length = inputs["input_ids"].shape[1]
        positions = torch.cat([torch.arange(length)[None, None], stock_positions(pipe, inputs)])
        with torch.no_grad():
            out = pipe.model.generate(**{**inputs, "attention_mask": full_mask}, position_ids=positions, max_new_tokens=8,
                                      min_new_tokens=8, do_sample=False, pad_token_id=pipe.pad_token_id)
        ours_ids = pipe.processor.tokenizer(ours.text, add_special_tokens=False)["input_ids"]
        reference = pipe.processor.tokenizer.decode(out[0, length:], skip_special_tokens=True).strip()
        assert ours.text == reference and len(ours_ids) >= 4


def test_decoding_from_rope_deltas_lands_where_the_full_prompt_would(qwen_pipe, qwen_images):
    """After a pruned prefill, a cached step with no position_ids takes its position from the model's rope_deltas:
    its logits equal the masked full model's next step at the full prompt's next position."""
    pipe = qwen_pipe
    inputs = pipe.prepare(qwen_images[1:2], QUESTIONS[1:2])
    sel, projected, ids, mask = pruned_prompt(pipe, inputs, QUESTIONS[1])
    ours = pipe.adapter.generation_inputs(inputs, [sel], ids, mask)["position_ids"]
    nxt = torch.tensor([[5]])
    positions = stock_positions(pipe, inputs)
    full_mask = torch.zeros_like(inputs["attention_mask"])
    full_mask[0, kept_rows(pipe, inputs, sel)] = 1
    with torch.no_grad():
        first = pipe.model(input_ids=ids, attention_mask=mask, position_ids=ours[1:], use_cache=True,
                           mm_encoder_outputs=pipe.adapter.image_inputs(projected))
        # no mask (one unpadded prompt): the stock model places the step at cache length + rope_deltas
        step = pipe.model(input_ids=nxt, cache=first.cache, use_cache=True).logits[0, -1]
        both = torch.cat([inputs["input_ids"], nxt], 1)
        reference = pipe.model(
            input_ids=both, attention_mask=torch.cat([full_mask, torch.ones(1, 1, dtype=full_mask.dtype)], 1),
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
            position_ids=torch.cat([positions, positions[..., -1:] + 1], -1),
        ).logits[0, -1]
    torch.testing.assert_close(step, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method,budget",
    [(KeepAboveMean(), "auto"), ("fastervlm", 0.3), ("prumerge", "auto"), ("pool", 7), ("divprune", 5)],
)
def test_batch_of_different_sizes_with_different_k_matches_single_runs(qwen_pipe, qwen_images, method, budget):
    check_batch_equals_single_runs(qwen_pipe, qwen_images, QUESTIONS, method, budget, per_tile=False)


def eager_attention_of_block(pipe, inputs, layer):
    """The tower's own attention probabilities at ``layer`` (eager path, recorded as it computes them), per image."""
    adapter = pipe.adapter
    modeling = importlib.import_module(adapter.modeling)
    target = adapter.tower.blocks[layer].attn
    recorded, original = [], modeling.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        if module is target:
            recorded.append(weights[0])
        return out, weights

    previous = adapter.tower.config._attn_implementation
    adapter.tower.set_attn_implementation("eager")
    modeling.eager_attention_forward = recording
    try:
        with torch.no_grad():
            out = adapter.tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        modeling.eager_attention_forward = original
        adapter.tower.set_attn_implementation(previous)
    return recorded, out


def test_cls_attention_is_the_received_attention_at_a_full_attention_layer(qwen_path, qwen_pipe, qwen_images):
    """Checked against the tower's own eager attention probabilities: head mean, mean over every patch query of the
    image, the four patches of each merged token summed; tower order mapped to raster order by matching the
    merger's output rows with the stock pooler output."""
    pipe, adapter = qwen_pipe, qwen_pipe.adapter
    spec = get("fastervlm").attention
    layer = adapter.attention_layer(spec)
    full_layers = adapter.tower.config.fullatt_block_indexes if qwen_path[0] == "2.5" else range(adapter.num_layers)
    assert layer in full_layers and layer == (1 if qwen_path[0] == "2.5" else adapter.num_layers + spec.layer)
    inputs = pipe.prepare(qwen_images[:2], QUESTIONS[:2])
    grids = adapter.grids(inputs)
    ours = adapter.signals(inputs, grids, frozenset({Signal.FEATURES, Signal.CLS_ATTN}), spec)
    recorded, out = eager_attention_of_block(pipe, inputs, layer)
    assert [w.shape[-1] for w in recorded] == [4 * g.num_candidates for g in grids], "one full-image call per image"
    merged_tower_order = adapter.merger(out.last_hidden_state)
    stock = out.pooler_output
    raster_to_tower = torch.cdist(stock, merged_tower_order).argmin(1)
    first = 0
    for b, (weights, grid) in enumerate(zip(recorded, grids)):
        per_patch = weights.float().mean(0).mean(0)  # heads, then query rows
        per_token = per_patch.view(-1, 4).sum(1)  # tower order within the image
        n = grid.num_candidates
        expected = per_token[raster_to_tower[first : first + n] - first]
        torch.testing.assert_close(ours[b][Signal.CLS_ATTN], expected, atol=1e-6, rtol=1e-5)
        first += n
    [r] = pipe(qwen_images[:1], QUESTIONS[:1], method="fastervlm", budget=0.3, max_new_tokens=1)
    assert r.selection.info["cls_attn"] == "received_attn" and r.selection.info["attn_layer"] == layer


def test_qwen25_attention_layer_is_the_last_full_layer_at_or_before_the_asked_one(qwen_path, qwen_pipe):
    from vtc.methods.base import AttentionSpec

    adapter = qwen_pipe.adapter
    chosen = [adapter.attention_layer(AttentionSpec(layer=i)) for i in (0, 1, 2, 3, -1, -2)]
    # tiny tower: 4 layers; Qwen2.5-VL attends fully in layers 1 and 3 only
    assert chosen == ([1, 1, 1, 3, 3, 1] if qwen_path[0] == "2.5" else [0, 1, 2, 3, 3, 2])


def test_merged_token_takes_the_rounded_mean_position_of_its_sources(qwen_pipe):
    """Hand-worked, grid 2x3 at text offset 10: sources 0, 1 and 3 are (h, w) = (0,0), (0,1), (1,0): mean (1/3, 1/3)
    -> (0, 0) -> (10, 10); sources 4 and 5, (1,1) and (1,2): mean (1, 1.5) -> rounds half to even: (11, 12).
    Kept token 2 is sent first with its own position (0, 2) -> (10, 12)."""
    h, w = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    positions = torch.stack([torch.zeros(6, dtype=torch.long), h.flatten(), w.flatten()]) + 10
    features = torch.zeros(6, 2)
    sel = Selection(features[:3], torch.tensor([Origin.MERGED, Origin.MERGED, Origin.KEPT]),
                    [torch.tensor([0, 1, 3]), torch.tensor([4, 5]), torch.tensor([2])], owner=torch.tensor([0, 0, 2, 0, 1, 1]))
    got = qwen_pipe.adapter.token_positions(sel, positions)
    assert got.T.tolist() == [[10, 10, 12], [10, 10, 10], [10, 11, 12]]


def test_merged_token_is_the_merger_on_the_mean_of_its_groups(qwen_pipe, qwen_images):
    """A merge of two tokens sends the stock merger applied to the mean of their two 2x2 groups (patch by patch)."""
    pipe, adapter = qwen_pipe, qwen_pipe.adapter
    inputs = pipe.prepare(qwen_images[2:3], QUESTIONS[:1])
    [signals] = adapter.signals(inputs, adapter.grids(inputs), frozenset({Signal.FEATURES}), get("none").attention)
    groups = signals[Signal.FEATURES]
    merged = Selection(((groups[3] + groups[7]) / 2)[None], torch.tensor([Origin.MERGED]), [torch.tensor([3, 7])],
                       owner=torch.full((groups.shape[0],), -1))
    [sent] = adapter.project([merged])
    width = adapter.merger.ln_q.weight.shape[0]
    patches = (groups[3].view(4, width) + groups[7].view(4, width)) / 2
    with torch.no_grad():
        expected = adapter.merger.mlp(adapter.merger.ln_q(patches).view(1, -1))
    torch.testing.assert_close(sent[-1:], expected)


@pytest.mark.parametrize("name", available())
def test_every_method_runs_or_refuses_clearly(qwen_pipe, qwen_images, name):
    refused = {"downsample": "native-resolution grids are not supported", "visionzip": "keep_cls=False",
               "recoverable": "text-to-patch score.*--text-source llm", "cdpruner": "text-to-patch score.*--text-source llm",
               "vscan": "shallow .*layer .*no CLS token",
               "tome_tower": "in-tower hook is not wired for qwen",
               "flowcut": "in-tower hook is not wired for qwen",
               "visiontrim": "text-to-patch score.*--text-source llm"}
    check_runs_or_refuses(qwen_pipe, qwen_images, QUESTIONS, name, refused, llm_budget=0.5)


def test_refusals_name_what_is_missing(qwen_pipe, qwen_images, tiny_dirs):
    from vtc.pipeline import Pipeline

    pipe = qwen_pipe
    [r] = pipe(qwen_images[:1], QUESTIONS[:1], method="visionzip", budget=0.3, max_new_tokens=1, keep_cls=False)
    assert r.selection.counts()["global"] == 0
    with_clip = Pipeline(pipe.model, pipe.processor, Pipeline.from_pretrained(tiny_dirs[0], clip=tiny_dirs[1]).adapter.text_scorer)
    with pytest.raises(VTCError, match="ClipTextScorer.*--text-source llm"):
        with_clip(qwen_images[:1], QUESTIONS[:1], method="recoverable", max_new_tokens=1)
    inputs = pipe.prepare(qwen_images[:2], QUESTIONS[:2])
    video = {**inputs, "image_grid_thw": inputs["image_grid_thw"] * torch.tensor([2, 1, 1])}
    with pytest.raises(VTCError, match="video input .*t=2"):
        pipe.generate(video, QUESTIONS[:2], "fastervlm", 0.3, max_new_tokens=1)
    with pytest.raises(VTCError, match="video input is not supported"):
        pipe.generate({**inputs, "pixel_values_videos": inputs["pixel_values"]}, QUESTIONS[:2], "none", "auto", max_new_tokens=1)
    with pytest.raises(VTCError, match="pixel_values must be .*patches image_grid_thw describes"):
        pipe.generate({**inputs, "pixel_values": inputs["pixel_values"][:-4]}, QUESTIONS[:2], "none", "auto", max_new_tokens=1)
    with pytest.raises(VTCError, match="exactly one image per prompt"):
        pipe.generate({**inputs, "input_ids": inputs["input_ids"][:1]}, QUESTIONS[:1], "none", "auto", max_new_tokens=1)
    with pytest.raises(VTCError, match="LlavaForConditionalGeneration is not supported.*Qwen2"):
        type(pipe.adapter)(Pipeline.from_pretrained(tiny_dirs[0]).model)


@pytest.mark.parametrize("method", ["recoverable", "fastervlm+text", "cdpruner", "visiontrim"])
def test_text_guided_methods_run_with_the_llm_embedding_source(qwen_path, qwen_images, method):
    from vtc.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(qwen_path[1], text_source="llm")
    budget = "auto" if method == "recoverable" else 0.3
    batch = pipe(qwen_images, QUESTIONS, method=method, budget=budget, max_new_tokens=3)
    singles = [pipe([i], [q], method=method, budget=budget, max_new_tokens=3)[0] for i, q in zip(qwen_images, QUESTIONS)]
    assert [r.tokens_after for r in batch] == [r.tokens_after for r in singles]
    assert [r.text for r in batch] == [r.text for r in singles]


def test_in_llm_pruning_that_keeps_everything_is_stock_generate(qwen_pipe, qwen_images):
    inputs = qwen_pipe.prepare(qwen_images[:2], QUESTIONS[:2])
    kept_all = qwen_pipe.generate(inputs, QUESTIONS[:2], "fastv", 1.0, max_new_tokens=6, **LLM_OPTIONS["fastv"])
    assert [r.text for r in kept_all] == stock_text(qwen_pipe, inputs)
    pruned = qwen_pipe.generate(inputs, QUESTIONS[:2], "fastv", 0.2, max_new_tokens=2, **LLM_OPTIONS["fastv"])
    assert [r.selection.info["llm_kept"] for r in pruned] == [Budget.parse(0.2).tokens(r.tokens_before) for r in pruned]


def test_map_panel_covers_the_picture(qwen_pipe):
    sel = Selection.build(torch.zeros(24, 2), torch.arange(3))
    sel.layout = QwenGrid((4, 6))
    [(_, index, boxes)] = qwen_pipe.adapter.map_panels(sel)
    assert torch.equal(index, torch.arange(24)) and boxes.shape == (24, 4)
    assert abs(float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()) - 1) < 1e-9


def full_token_inputs(pipe, images):
    """input ids, mask, the full-token image features and the stock M-RoPE positions of a batch."""
    inputs = pipe.prepare(images, QUESTIONS[: len(images)])
    selections, _ = pipe.compress(inputs, QUESTIONS[: len(images)], get("none"), Budget.parse("auto"))
    feats = pipe.adapter.image_inputs(pipe.adapter.project(selections))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = pipe.adapter.generation_inputs(inputs, selections, ids, mask)["position_ids"]
    return ids, mask, feats, positions


def check_in_llm_removal_equals_masking(pipe, images, k: int, after_pruner=None) -> None:
    """In-LLM pruning before decoder layer k of a padded batch of two images (the first keeps all but its first 5
    image rows, the second every third): every kept row's logits equal the full run's with the dropped image rows
    hidden from layers k on. ``after_pruner(lm)`` runs once the pruner's context has closed (checks it restored the model)."""
    from test_in_llm import Recorder

    from vtc.models.llm_prune import InLLMPruner

    ids, mask, feats, positions = full_token_inputs(pipe, images[:2])
    lm = pipe.model.model.language_model
    method = Recorder(k, lambda b, img: img[5:] if b == 0 else img[::3])
    with torch.no_grad():
        with InLLMPruner(lm, method, Budget.parse(1.0), ids, mask, pipe.adapter.image_token_id) as pruner:
            pruned = pipe.model(input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs=feats)
        if after_pruner is not None:
            after_pruner(lm)
        rows, length = pruner.rows, ids.shape[1]
        kept = torch.zeros_like(mask, dtype=torch.bool)
        for b in range(2):
            kept[b, rows.index[b][rows.valid[b]]] = True
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & (kept & mask.bool())[:, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool)[None]

        def hide(module, args, kwargs):
            return args, {**kwargs, "attention_mask": allowed[:, None]}

        handles = [layer.register_forward_pre_hook(hide, with_kwargs=True) for layer in lm.layers[k:]]
        try:
            reference = pipe.model(input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs=feats)
        finally:
            for h in handles:
                h.remove()
    assert pruner.kept_counts() == [24 - 5, 14]
    for b in range(2):
        valid = rows.valid[b]
        torch.testing.assert_close(pruned.logits[b][valid], reference.logits[b, rows.index[b][valid]], atol=1e-5, rtol=1e-5)


def test_in_llm_physical_removal_equals_masking_with_3d_rotary(qwen_pipe, qwen_images):
    """In-LLM pruning at a middle layer of the Qwen2 decoder: every kept row's logits equal the full run's with the
    dropped image rows hidden from the layers after it; each kept row keeps its own (t, h, w) rotary row. A padded
    batch of two image sizes keeping different numbers of tokens."""
    check_in_llm_removal_equals_masking(qwen_pipe, qwen_images, k=2)
