"""Qwen3-VL (merged tokens, M-RoPE, DeepStack) on a tiny random model saved and loaded back."""

import pytest
import torch
from conftest import random_image
from test_in_llm import LLM_OPTIONS, Recorder
from test_llava_adapter import KeepAboveMean
from test_llava_next import check_batch_equals_single_runs, check_none_is_stock_generate, check_runs_or_refuses
from test_qwen_vl import check_in_llm_removal_equals_masking, eager_attention_of_block, full_token_inputs, kept_rows, pruned_prompt, stock_positions

from vtc.methods import Budget, Origin, Selection, Signal, VTCError, get
from vtc.methods.base import available
from vtc.models.llm_prune import InLLMPruner
from vtc.models.qwen3_vl import ImageOnlyQwen3VLProcessor, Qwen3VLAdapter
from vtc.testing import save_tiny_qwen3_vl

QUESTIONS = ["what is the color ?", "how many circle ?", "describe the picture .", "is it red ?"]
# (height, width) at 4-pixel patches merged 2x2: grids of 4x6, 8x5, 4x4 and 6x6 merged tokens
SIZES = [(32, 48), (64, 40), (32, 32), (48, 48)]
DEEPSTACK = (0, 1, 2)  # tower layers; the decoder adds them after its layers 0, 1, 2 (of 4)


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3") / "qwen3", deepstack_layers=DEEPSTACK)


@pytest.fixture(scope="module")
def pipe(qwen3_path):
    from vtc.pipeline import Pipeline

    return Pipeline.from_pretrained(qwen3_path)


@pytest.fixture
def images():
    return [random_image(i + 1, size) for i, size in enumerate(SIZES)]


class InjectionRecorder:
    """Records what the decoder's DeepStack step adds: per call, the image-row mask and the added rows."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []

    def __enter__(self):
        stock = self.lm._deepstack_process

        def record(hidden, masks, embeds):
            self.calls.append((masks.clone(), embeds.clone()))
            return stock(hidden, masks, embeds)

        self.lm._deepstack_process = record
        return self

    def __exit__(self, *exc):
        del self.lm._deepstack_process


def test_adapter_and_processor_come_from_the_checkpoint(pipe):
    assert type(pipe.adapter) is Qwen3VLAdapter
    assert pipe.adapter.language_model is pipe.model.model.language_model
    assert isinstance(pipe.processor, ImageOnlyQwen3VLProcessor) and getattr(pipe.processor, "video_processor", None) is None
    assert list(pipe.adapter.tower.deepstack_visual_indexes) == list(DEEPSTACK)


def test_none_is_token_for_token_stock_generate_single_and_padded_batch(pipe, images):
    check_none_is_stock_generate(pipe, images, QUESTIONS)


def test_kept_tokens_are_sent_as_the_stock_tower_outputs(pipe, images):
    """Projecting every FEATURES row gives the stock pooler output and each stock DeepStack feature list, raster order."""
    inputs = pipe.prepare(images[:2], QUESTIONS[:2])
    selections, _ = pipe.compress(inputs, QUESTIONS[:2], get("none"), Budget.parse("auto"))
    ours = torch.cat(pipe.adapter.project(selections))
    assert ours.shape[1] == 1 + len(DEEPSTACK)
    with torch.no_grad():
        stock = pipe.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(ours[:, 0], torch.cat(stock.pooler_output), atol=1e-6, rtol=1e-5)
    for layer, feature in enumerate(stock.deepstack_features):
        torch.testing.assert_close(ours[:, 1 + layer], torch.cat(feature), atol=1e-6, rtol=1e-5)


def tower_layer_states(adapter, inputs):
    """(patches, C) output of every tower block, recorded by forward hooks on the stock tower."""
    states = {}
    handles = [block.register_forward_hook(lambda m, a, out, i=i: states.__setitem__(i, out)) for i, block in enumerate(adapter.tower.blocks)]
    try:
        with torch.no_grad():
            adapter.tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        for h in handles:
            h.remove()
    return states


def test_a_merge_applies_the_same_weights_to_the_main_and_every_deepstack_group(pipe, images):
    """A 1:3 weighted merge of tokens 3 and 7 sends the stock merger on the 1:3 mean of their last-block 2x2 groups,
    and each DeepStack merger on the 1:3 mean of their groups at its own tower layer (states from block hooks)."""
    adapter = pipe.adapter
    inputs = pipe.prepare(images[2:3], QUESTIONS[:1])
    [signals] = adapter.signals(inputs, adapter.grids(inputs), frozenset({Signal.FEATURES}), get("none").attention)
    rows = signals[Signal.FEATURES]
    merged = Selection((rows[3] * 0.25 + rows[7] * 0.75)[None], torch.tensor([Origin.MERGED]), [torch.tensor([3, 7])],
                       owner=torch.full((rows.shape[0],), -1))
    [sent] = adapter.project([merged])
    states = tower_layer_states(adapter, inputs)
    width = states[0].shape[1]

    def mean_group(layer):  # 4 patches per merged token, raster order (no windows in this tower)
        groups = states[layer].view(-1, 4, width)
        return groups[3] * 0.25 + groups[7] * 0.75

    with torch.no_grad():
        expected = [adapter.merger(mean_group(len(states) - 1))]
        expected += [m(mean_group(layer).reshape(1, -1)) for m, layer in zip(adapter.tower.deepstack_merger_list, DEEPSTACK)]
    assert sent.shape == (1, 1 + len(DEEPSTACK), 48)
    for got, want in zip(sent.unbind(1), expected):
        torch.testing.assert_close(got, want.reshape(1, -1), atol=1e-6, rtol=1e-5)


def masked_full_run(pipe, inputs, rows):
    """Stock pixel path on the full prompt with only ``rows`` visible and the stock positions; records DeepStack."""
    full_mask = torch.zeros_like(inputs["attention_mask"])
    full_mask[0, rows] = 1
    with torch.no_grad(), InjectionRecorder(pipe.model.model.language_model) as rec:
        logits = pipe.model(**{**inputs, "attention_mask": full_mask}, position_ids=stock_positions(pipe, inputs)).logits
    return logits, rec.calls


def merging_prompt(pipe, inputs):
    """VisionZip without CLS at 30%: kept tokens and merged contextual ones."""
    [sel], _ = pipe.compress(inputs, QUESTIONS[:1], get("visionzip", keep_cls=False), Budget.parse(0.3))
    projected = pipe.adapter.project([sel])
    ids, mask = pipe.adapter.splice_ids(inputs["input_ids"], inputs["attention_mask"], [projected[0].shape[0]],
                                        pipe.pad_token_id, expected=pipe.adapter.tokens_before(inputs))
    return sel, projected, ids, mask


@pytest.mark.parametrize("b,method", [(0, "fastervlm"), (1, "visionzip")])
def test_pruning_equals_masking_and_injects_the_kept_deepstack_rows(pipe, images, b, method):
    """Logits of the pruned prompt's rows equal the full model's (stock pixel path) with the dropped image tokens
    masked and every position stock; the DeepStack rows the decoder adds at each layer are the masked full run's
    rows at the kept positions (a merging method: its single-source tokens checked, its merged rows sent too)."""
    inputs = pipe.prepare(images[b : b + 1], QUESTIONS[b : b + 1])
    if method == "visionzip":
        sel, projected, ids, mask = merging_prompt(pipe, inputs)
    else:
        sel, projected, ids, mask = pruned_prompt(pipe, inputs, QUESTIONS[b], method=method)
    positions = pipe.adapter.generation_inputs(inputs, [sel], ids, mask)["position_ids"]
    with torch.no_grad(), InjectionRecorder(pipe.model.model.language_model) as rec:
        pruned = pipe.model(input_ids=ids, attention_mask=mask, position_ids=positions[1:],
                            mm_encoder_outputs=pipe.adapter.image_inputs(projected)).logits
    assert len(rec.calls) == len(DEEPSTACK)
    kept = sel.kept_indices().sort().values
    single = int(kept.numel())
    if method == "fastervlm":
        rows = kept_rows(pipe, inputs, sel)
        assert sel.num_tokens == single < sel.num_patches
        full, full_calls = masked_full_run(pipe, inputs, rows)
        torch.testing.assert_close(pruned[0], full[0, rows], atol=1e-5, rtol=1e-5)
    else:
        assert sel.num_tokens > single > 0, "visionzip should keep some tokens and merge others"
        _, full_calls = masked_full_run(pipe, inputs, list(range(inputs["input_ids"].shape[1])))
    for (_, ours), (_, stock) in zip(rec.calls, full_calls, strict=True):
        assert ours.shape[0] == sel.num_tokens and stock.shape[0] == sel.num_patches
        torch.testing.assert_close(ours[:single], stock[kept], atol=1e-6, rtol=1e-5)


def test_greedy_decoding_continues_as_the_masked_full_model(pipe, images):
    """8 greedy tokens after a vision-side selection equal stock generate on the full prompt with the dropped image
    tokens masked and the stock positions."""
    for b in (0, 1):
        inputs = pipe.prepare(images[b : b + 1], QUESTIONS[b : b + 1])
        [ours] = pipe.generate(inputs, QUESTIONS[b : b + 1], "fastervlm", 0.3, max_new_tokens=8)
        full_mask = torch.zeros_like(inputs["attention_mask"])
        full_mask[0, kept_rows(pipe, inputs, ours.selection)] = 1
        length = inputs["input_ids"].shape[1]
        positions = torch.cat([torch.arange(length)[None, None], stock_positions(pipe, inputs)])
        with torch.no_grad():
            out = pipe.model.generate(**{**inputs, "attention_mask": full_mask}, position_ids=positions, max_new_tokens=8,
                                      min_new_tokens=8, do_sample=False, pad_token_id=pipe.pad_token_id)
        reference = pipe.processor.tokenizer.decode(out[0, length:], skip_special_tokens=True).strip()
        assert ours.text == reference and len(pipe.processor.tokenizer(ours.text, add_special_tokens=False)["input_ids"]) >= 4


@pytest.mark.parametrize("method,budget", [(KeepAboveMean(), "auto"), ("prumerge", "auto"), ("divprune", 5)])
def test_batch_of_different_sizes_with_different_k_matches_single_runs(pipe, images, method, budget):
    check_batch_equals_single_runs(pipe, images, QUESTIONS, method, budget, per_tile=False)


def test_cls_attention_is_the_received_attention_of_the_asked_layer(pipe, images):
    """Against the tower's own eager attention probabilities at the method's layer (every layer attends fully):
    head mean, mean over every patch query of the image, the four patches of each merged token summed."""
    adapter = pipe.adapter
    spec = get("fastervlm").attention
    layer = adapter.attention_layer(spec)
    assert layer == adapter.num_layers + spec.layer
    inputs = pipe.prepare(images[:2], QUESTIONS[:2])
    grids = adapter.grids(inputs)
    ours = adapter.signals(inputs, grids, frozenset({Signal.FEATURES, Signal.CLS_ATTN}), spec)
    recorded, _ = eager_attention_of_block(pipe, inputs, layer)
    assert [w.shape[-1] for w in recorded] == [4 * g.num_candidates for g in grids], "one full-image call per image"
    for b, weights in enumerate(recorded):
        expected = weights.float().mean(0).mean(0).view(-1, 4).sum(1)
        torch.testing.assert_close(ours[b][Signal.CLS_ATTN], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", available())
def test_every_method_runs_or_refuses_clearly(pipe, images, name):
    refused = {"downsample": "native-resolution grids are not supported", "visionzip": "keep_cls=False",
               "recoverable": "text-to-patch score.*--text-source llm", "cdpruner": "text-to-patch score.*--text-source llm",
               "visiontrim": "text-to-patch score.*--text-source llm",
               "sparsevlm": "merged image rows .* layer 1, before this model.s last DeepStack addition.*prune at a later layer or "
                             "without merging \\(SparseVLM: recycling=False\\)",
               "vscan": "shallow .*layer .*no CLS token", "tome_tower": "in-tower hook is not wired for qwen",
               "flowcut": "in-tower hook is not wired for qwen"}
    check_runs_or_refuses(pipe, images, QUESTIONS, name, refused, llm_budget=0.5)


def test_refusals_name_what_is_missing(pipe, images, tiny_dirs):
    from vtc.pipeline import Pipeline

    [r] = pipe(images[:1], QUESTIONS[:1], method="sparsevlm", budget=0.9, max_new_tokens=1, layers=(3,))
    assert r.selection.info["llm_kept"] >= 1, "merging after the last DeepStack addition runs"
    [r] = pipe(images[:1], QUESTIONS[:1], method="sparsevlm", budget=0.5, max_new_tokens=1, layers=(1, 2), recycling=False)
    assert r.selection.info["llm_kept"] >= 1
    with_clip = Pipeline(pipe.model, pipe.processor, Pipeline.from_pretrained(tiny_dirs[0], clip=tiny_dirs[1]).adapter.text_scorer)
    with pytest.raises(VTCError, match="ClipTextScorer.*--text-source llm"):
        with_clip(images[:1], QUESTIONS[:1], method="recoverable", max_new_tokens=1)
    inputs = pipe.prepare(images[:2], QUESTIONS[:2])
    video = {**inputs, "image_grid_thw": inputs["image_grid_thw"] * torch.tensor([2, 1, 1])}
    with pytest.raises(VTCError, match="Qwen3-VL: video input .*t=2"):
        pipe.generate(video, QUESTIONS[:2], "fastervlm", 0.3, max_new_tokens=1)
    with pytest.raises(VTCError, match="video input is not supported"):
        pipe.generate({**inputs, "pixel_values_videos": inputs["pixel_values"]}, QUESTIONS[:2], "none", "auto", max_new_tokens=1)
    with pytest.raises(VTCError, match="LlavaForConditionalGeneration is not supported.*Qwen3VL"):
        Qwen3VLAdapter(Pipeline.from_pretrained(tiny_dirs[0]).model)


def test_text_guided_method_runs_with_the_llm_embedding_source(qwen3_path, images):
    from vtc.pipeline import Pipeline

    llm_pipe = Pipeline.from_pretrained(qwen3_path, text_source="llm")
    batch = llm_pipe(images, QUESTIONS, method="recoverable", budget="auto", max_new_tokens=3)
    singles = [llm_pipe([i], [q], method="recoverable", budget="auto", max_new_tokens=3)[0] for i, q in zip(images, QUESTIONS)]
    assert [r.text for r in batch] == [r.text for r in singles]
    assert all(r.tokens_after < r.tokens_before for r in batch)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_in_llm_physical_removal_equals_masking_with_deepstack(pipe, images, k):
    """In-LLM pruning before decoder layer k: every kept row's logits equal the full run's with the dropped image rows
    hidden from layers k on. k = 1 and 2 prune before DeepStack additions (after layers 1 and 2), so the kept rows
    must get their own DeepStack rows; k = 3 prunes after the last. A padded batch of two image sizes."""

    def stock_step_restored(lm):
        assert "_deepstack_process" not in vars(lm), "the stock DeepStack step is restored"

    check_in_llm_removal_equals_masking(pipe, images, k, after_pruner=stock_step_restored)


def test_in_llm_scores_match_eager_attention_with_qk_norms(pipe, qwen3_path, images):
    """The last row's head-mean attention that in-LLM methods score with equals the eager decoder's own probabilities
    (Qwen3's per-head q/k RMS norms and the 3-D rotary rows applied)."""
    from transformers import Qwen3VLForConditionalGeneration

    eager = Qwen3VLForConditionalGeneration.from_pretrained(qwen3_path, attn_implementation="eager").eval()
    ids, mask, feats, positions = full_token_inputs(pipe, images[:2])
    layer = 2
    method = Recorder(layer, lambda b, img: img)
    with torch.no_grad():
        with InLLMPruner(pipe.model.model.language_model, method, Budget.parse(1.0), ids, mask, pipe.adapter.image_token_id):
            pipe.model(input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs=feats)
        out = eager(input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs=feats, output_attentions=True)
    expected = out.attentions[layer - 1][:, :, -1, :].mean(1)
    for b in range(2):
        torch.testing.assert_close(method.seen[b][0], expected[b], atol=1e-5, rtol=1e-5)


def test_in_llm_default_fastv_prunes_before_a_deepstack_addition_and_keeps_the_budget(pipe, images):
    inputs = pipe.prepare(images[:2], QUESTIONS[:2])
    results = pipe.generate(inputs, QUESTIONS[:2], "fastv", 0.25, max_new_tokens=2, **LLM_OPTIONS["fastv"])
    assert LLM_OPTIONS["fastv"]["layer"] <= max(range(len(DEEPSTACK)))
    assert [r.selection.info["llm_kept"] for r in results] == [Budget.parse(0.25).tokens(r.tokens_before) for r in results]
