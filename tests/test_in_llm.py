"""In-LLM pruning on a stock tiny LLaVA (4 decoder layers, 64 image tokens): exactness against references."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vtc.methods import Budget, VTCError, get
from vtc.methods.dart import duplication_picks
from vtc.methods.feather import uniform_grid
from vtc.methods.llm_base import Choice, LLMMethod, Stage, average_tokens
from vtc.methods.sparsevlm import density_peaks, select_raters
from vtc.models.llm_prune import InLLMPruner
from vtc.testing import save_tiny_llava

from conftest import random_image

QUESTIONS = ["what is the color of the circle ?", "how many red square ?", "is there a triangle ?", "what shape ?"]
LLM_OPTIONS = {"fastv": {"layer": 2}, "dart": {"layer": 2}, "pyramiddrop": {"layers": (1, 2, 3)}, "feather": {"layers": (1, 2)},
               "sparsevlm": {"layers": (1, 2, 3)}}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    from vtc.pipeline import Pipeline

    path = save_tiny_llava(tmp_path_factory.mktemp("deep") / "llava", image_size=64, text_layers=4)
    return Pipeline.from_pretrained(path), path


def spliced(pipe, images, questions):
    """input_ids / attention_mask / image features for the full-token path (vision side 'none')."""
    inputs = pipe.prepare(images, questions)
    sels, _ = pipe.compress(inputs, questions, get("none"), Budget.parse("auto"))
    feats = pipe.adapter.project(sels)
    ids, mask = pipe.adapter.splice_ids(inputs["input_ids"], inputs["attention_mask"], [s.num_tokens for s in sels], pipe.pad_token_id)
    return ids, mask, pipe.adapter.image_inputs(feats)


class Recorder(LLMMethod):
    """Keeps a fixed set of image rows per sample at one layer and records the scoring rows it was offered."""

    name = "recorder"

    def __init__(self, layer, keep_fn, rope=True):
        self.layer, self.keep_fn, self.rope, self.seen = layer, keep_fn, rope, None

    def plan(self, n_image, num_layers, budget):
        return [Stage(self.layer, n_image)]

    def choose(self, index, stages, ctx):
        last = [torch.tensor([ctx.last_row])] * len(ctx.image_rows)
        self.seen = ctx.attention(self.layer - 1, ctx.previous, last, rope=self.rope)
        return [Choice(self.keep_fn(b, img)) for b, img in enumerate(ctx.image_rows)]


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", ["fastv", "dart", "pyramiddrop", "sparsevlm"])
def test_keeping_everything_is_token_for_token_stock_generate(deep, name):
    pipe, _ = deep
    images = [random_image(i, size=(50, 60)) for i in range(3)]
    ids, mask, feats = spliced(pipe, images, QUESTIONS[:3])
    stock = pipe.model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats, max_new_tokens=6, do_sample=False,
                                pad_token_id=pipe.pad_token_id)
    method = get(name, **LLM_OPTIONS[name])
    if name == "sparsevlm":
        method.recycling = False
    with InLLMPruner(pipe.model.model.language_model, method, Budget.parse(1.0), ids, mask, pipe.adapter.image_token_id):
        ours = pipe.model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats, max_new_tokens=6, do_sample=False,
                                   pad_token_id=pipe.pad_token_id)
    assert torch.equal(ours, stock)


def test_physical_removal_equals_masking_the_dropped_tokens(deep):
    pipe, _ = deep
    images = [random_image(i + 5, size=(50, 60)) for i in range(2)]
    ids, mask, feats = spliced(pipe, images, QUESTIONS[:2])
    k = 2
    keeps = [24, 32]  # the two samples keep different numbers of image tokens
    method = Recorder(k, lambda b, img: img[40:] if b == 0 else img[::2])
    lm = pipe.model.model.language_model
    with torch.no_grad():
        with InLLMPruner(lm, method, Budget.parse(1.0), ids, mask, pipe.adapter.image_token_id) as pruner:
            pruned = pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats, use_cache=True)
        rows = pruner.rows
        # reference: full length, original positions, dropped image tokens hidden from layers >= k
        length = ids.shape[1]
        kept = torch.zeros_like(mask, dtype=torch.bool)
        for b in range(2):
            kept[b, rows.index[b][rows.valid[b]]] = True
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        allowed = causal[None] & (kept & mask.bool())[:, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool)[None]

        def hide(module, args, kwargs):
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = allowed[:, None]
            return args, kwargs

        handles = [layer.register_forward_pre_hook(hide, with_kwargs=True) for layer in lm.layers[k:]]
        try:
            reference = pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats)
        finally:
            for h in handles:
                h.remove()
    torch.testing.assert_close(pruned.logits[:, -1], reference.logits[:, -1], atol=1e-5, rtol=1e-5)
    for b in range(2):  # every kept row's logits, not just the last one
        valid = rows.valid[b]
        torch.testing.assert_close(pruned.logits[b][valid], reference.logits[b, rows.index[b][valid]], atol=1e-5, rtol=1e-5)
    # KV cache: layers before k hold every position, layers from k on hold exactly the kept ones (+ masked padding slots)
    cache = pruned.cache
    for layer, entry in enumerate(cache.layers):
        assert entry.keys.shape[2] == (length if layer < k else rows.index.shape[1])
    assert [int(v.sum()) for v in rows.valid] == [int(mask[b].sum()) - 64 + keeps[b] for b in range(2)]
    assert pruner.kept_counts() == keeps


@pytest.mark.parametrize("rope", [True, False])
def test_scoring_rows_match_eager_attention(deep, rope):
    pipe, path = deep
    eager = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    images = [random_image(i + 9, size=(50, 60)) for i in range(2)]
    ids, mask, feats = spliced(pipe, images, QUESTIONS[:2])
    layer = 2
    method = Recorder(layer, lambda b, img: img, rope=rope)
    with torch.no_grad(), InLLMPruner(pipe.model.model.language_model, method, Budget.parse(1.0), ids, mask, pipe.adapter.image_token_id):
        pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats)
    if not rope:  # without RoPE: compare with q.k computed by hand from the eager model's layer input
        captured = {}

        def keep_input(module, args, kwargs):
            captured.setdefault("h", args[0] if args else kwargs["hidden_states"])

        hook = eager.model.language_model.layers[layer - 1].register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats, output_attentions=True)
    if rope:
        expected = out.attentions[layer - 1][:, :, -1, :].mean(1)
    else:
        hook.remove()
        attn = eager.model.language_model.layers[layer - 1].self_attn
        h = eager.model.language_model.layers[layer - 1].input_layernorm(captured["h"])
        b, length, _ = h.shape
        q = attn.q_proj(h[:, -1:]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
        kk = attn.k_proj(h).view(b, length, -1, attn.head_dim).transpose(1, 2).repeat_interleave(q.shape[1] // 2, dim=1)
        logits = (q @ kk.transpose(-1, -2)).squeeze(2) * attn.scaling
        logits = logits.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        expected = logits.softmax(-1).mean(1)
    for b in range(2):
        torch.testing.assert_close(method.seen[b][0], expected[b], atol=1e-5, rtol=1e-5)


def test_batch_of_four_with_different_kept_counts_matches_single_runs(deep):
    pipe, _ = deep
    images = [random_image(i + 20, size=(50, 60)) for i in range(4)]
    results = pipe(images, QUESTIONS, method="fastv", budget=20, max_new_tokens=5, layer=2)
    singles = [pipe([im], [q], method="fastv", budget=20, max_new_tokens=5, layer=2)[0] for im, q in zip(images, QUESTIONS)]
    assert [r.text for r in results] == [s.text for s in singles]
    assert all(r.selection.info["llm_kept"] == 20 for r in results)


def test_vision_side_then_in_llm_in_one_line(deep):
    pipe, _ = deep
    images = [random_image(i + 30, size=(50, 60)) for i in range(3)]
    results = pipe(images, QUESTIONS[:3], method="pool>dart", budget="48>0.5", max_new_tokens=3)
    assert all(r.tokens_after == 48 and r.selection.info["llm_kept"] == 24 for r in results)
    assert results[0].method == "pool>dart" and results[0].budget == "48>0.5"
    with pytest.raises(VTCError, match="two budgets"):
        pipe(images[:1], QUESTIONS[:1], method="pool>dart", budget="48")
    with pytest.raises(VTCError, match="in-LLM method"):
        pipe(images[:1], QUESTIONS[:1], method="pool>random", budget="48>4")
    with pytest.raises(VTCError, match="vision-side"):
        get("fastv+text")


@pytest.mark.parametrize("name", ["fastv", "dart", "pyramiddrop", "feather", "sparsevlm"])
def test_every_method_runs_on_a_batch_and_reports_the_layer_average(deep, name):
    pipe, _ = deep
    images = [random_image(i + 40, size=(50, 60)) for i in range(3)]
    results = pipe(images, QUESTIONS[:3], method=name, budget=24, max_new_tokens=3, **LLM_OPTIONS[name])
    for r in results:
        info = r.selection.info
        assert info["llm_method"] == name and 1 <= info["llm_kept"] <= 64
        if name in ("fastv", "dart"):
            assert info["llm_kept"] == 24 and info["llm_average_tokens"] == (2 * 64 + 2 * 24) / 4
        else:
            assert abs(info["llm_average_tokens"] - 24) <= 4  # solved layer-averaged budgets


# ----------------------------------------------------------------------------- formulas by hand


def test_average_tokens_and_official_schedules():
    assert average_tokens([Stage(2, 64)], 576, 32) == (2 * 576 + 30 * 64) / 32
    assert average_tokens([Stage(8, 288), Stage(16, 144), Stage(24, 72)], 576, 32) == 270.0  # PyramidDrop's default
    assert [(s.layer, s.keep) for s in get("pyramiddrop").plan(576, 32, Budget.parse("auto"))] == [(8, 288), (16, 144), (24, 72)]
    for target in (64, 128, 192):
        plan = get("sparsevlm").plan(576, 32, Budget.parse(target))
        assert [s.layer for s in plan] == [2, 6, 15] and abs(average_tokens(plan, 576, 32) - target) < 1
    with pytest.raises(VTCError, match="below"):
        get("pyramiddrop").plan(576, 32, Budget.parse(64))


def test_feather_grid_and_dart_picks_and_sparsevlm_raters_by_hand():
    assert uniform_grid(576, 3).numel() == 64 and uniform_grid(16, 3).tolist() == [0, 3, 12, 15]
    assert uniform_grid(10, 3).numel() == 0
    # DART: pivot 0 points along x; the least similar candidates to it are taken first, then pivot 1's
    h = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [-1.0, 0], [0.1, 0.9], [0.7, 0.7]])
    picks = duplication_picks(h, torch.tensor([1, 2, 3, 4, 5]), pivots=[0, 2], quotas=[2, 1])
    # cos to pivot 0: 1:0.99, 2:0, 3:-1, 4:0.11, 5:0.71 -> lowest two: 3, 2; then cos to pivot 2 among {1,4,5}: 1:0.11 lowest
    assert picks.tolist() == [3, 2, 1]
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[5.0, 0.0], [0.0, 5.0], [1.0, 0.0]])
    assert select_raters(image, text).tolist() == [0]  # softmax of (5, 0, 1): only the first is above the mean
    x = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 10.0)]) + torch.arange(10.0)[:, None] * 1e-3
    labels, centers = density_peaks(x, 2, 3)
    assert labels[:5].unique().numel() == 1 and labels[5:].unique().numel() == 1 and labels[0] != labels[5]


def test_in_llm_budget_errors_are_clear(deep):
    pipe, _ = deep
    with pytest.raises(VTCError, match="auto"):
        pipe([random_image(1)], QUESTIONS[:1], method="fastv", budget="auto", layer=2)
    with pytest.raises(VTCError, match="within 1..3"):
        pipe([random_image(1)], QUESTIONS[:1], method="fastv", budget=8, layer=7)


def test_single_unpadded_sample_uses_sdpa_causal_path_and_stays_exact(deep):
    pipe, _ = deep
    ids, mask, feats = spliced(pipe, [random_image(50, size=(50, 60))], QUESTIONS[:1])
    assert mask.all()  # one sample: no padding, so pruned layers get attention_mask=None (SDPA is_causal)
    lm = pipe.model.model.language_model
    method = Recorder(2, lambda b, img: img[::3])
    seen = []
    with torch.no_grad():
        with InLLMPruner(lm, method, Budget.parse(1.0), ids, mask, pipe.adapter.image_token_id) as pruner:
            # registered after the pruner's hooks, so it sees the arguments the layer really gets
            probe = lm.layers[3].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0].shape[1], kw.get("attention_mask"))), with_kwargs=True)
            pruned = pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats)
        probe.remove()
        kept = torch.zeros_like(mask, dtype=torch.bool)
        kept[0, pruner.rows.index[0]] = True
        length = ids.shape[1]
        allowed = (torch.tril(torch.ones(length, length, dtype=torch.bool)) & kept[0][None, :]) | torch.eye(length, dtype=torch.bool)

        def hide(module, args, kwargs):
            return args, {**kwargs, "attention_mask": allowed[None, None]}

        handles = [layer.register_forward_pre_hook(hide, with_kwargs=True) for layer in lm.layers[2:]]
        try:
            reference = pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats)
        finally:
            for h in handles:
                h.remove()
    assert len(seen) == 1 and seen[0][1] is None and seen[0][0] == pruner.rows.index.shape[1] < length
    torch.testing.assert_close(pruned.logits[0], reference.logits[0, pruner.rows.index[0]], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- plans and budgets by hand


def test_stage_layers_are_the_official_ones_at_official_depths_and_scaled_elsewhere():
    auto = Budget.parse("auto")
    for depth in (32, 40):  # LLaVA-1.5-7B and 13B: the official code keeps its layers
        assert [s.layer for s in get("pyramiddrop").plan(576, depth, auto)] == [8, 16, 24]
        assert [s.layer for s in get("sparsevlm").plan(576, depth, Budget.parse(192))] == [2, 6, 15]
    assert [s.layer for s in get("pyramiddrop").plan(576, 24, auto)] == [6, 12, 18]
    assert [s.layer for s in get("sparsevlm").plan(576, 16, Budget.parse(192))] == [1, 3, 8]  # 2/32, 6/32, 15/32 of 16
    assert [s.layer for s in get("feather").plan(576, 40, auto)] == [10, 20]


def test_sparsevlm_96_token_schedule_and_rank_schedule():
    plan = get("sparsevlm").plan(576, 32, Budget.parse(96))
    # the official 96 schedule (238, 48, 26) averages (2 x 576 + 4 x 238 + 9 x 48 + 17 x 26) / 32 = 93.1: its shape,
    # scaled up by about 4%, reaches 96
    assert abs(average_tokens(plan, 576, 32) - 96) < 1
    assert all(1.0 < s.keep / official < 1.08 for s, official in zip(plan, (238, 48, 26)))
    assert [(s.layer, s.keep) for s in get("sparsevlm", schedule="rank").plan(576, 32, Budget.parse(64))] == [(2, 576), (6, 576), (15, 576)]
    with pytest.raises(VTCError, match="'fixed' or 'rank'"):
        get("sparsevlm", schedule="other")
    with pytest.raises(VTCError, match="below what stages"):
        get("sparsevlm").plan(576, 32, Budget.parse(20))


def test_layer_averaged_budgets_are_met_and_out_of_reach_ones_refused():
    for name, target in (("pyramiddrop", 150), ("feather", 180), ("sparsevlm", 128)):
        plan = get(name).plan(576, 32, Budget.parse(target))
        assert abs(average_tokens(plan, 576, 32) - target) <= 1, name
        keeps = [s.keep for s in plan]
        assert keeps == sorted(keeps, reverse=True) and keeps[0] < 576
    with pytest.raises(VTCError, match="feather: a layer average of 100 tokens is below the 1[0-9]{2}"):
        get("feather").plan(576, 32, Budget.parse(100))  # 8 layers of 576 alone average 144
    with pytest.raises(VTCError, match="layers=\\(2, 8, 16\\)"):
        get("pyramiddrop").plan(576, 32, Budget.parse(100))


def test_check_layers_refuses_bad_stage_layers():
    LLMMethod.check_layers((1, 3), 4, "m")  # fine
    for layers in ((0, 2), (1, 4), (3, 2), (2, 2)):
        with pytest.raises(VTCError, match=r"m: pruning layers .* must be increasing and within 1\.\.3 for a 4-layer LLM"):
            LLMMethod.check_layers(layers, 4, "m")


def test_budget_for_average_finds_the_count_with_that_layer_average():
    from vtc.methods.llm_base import budget_for_average

    # FastV prunes once before layer 2 of 32: average = (2 x 576 + 30 x k) / 32. k = 30 gives 64.125 (k = 29: 63.19)
    assert budget_for_average(get("fastv"), 64, 576, 32) == Budget.parse(30)
    assert budget_for_average(get("fastv"), 100, 576, 32) == Budget.parse(69)  # (1152 + 30 x 69) / 32 = 100.7
    assert budget_for_average(get("fastv"), 51, 576, 32) == Budget.parse(16)  # exactly (1152 + 30 x 16) / 32 = 51
    # PyramidDrop's budget is itself a layer average: the target is passed through
    assert budget_for_average(get("pyramiddrop"), 150, 576, 32) == Budget.parse(150)
    with pytest.raises(VTCError, match="fastv: a layer average of 30 image tokens is out of reach"):
        budget_for_average(get("fastv"), 30, 576, 32)  # k = 1 already averages 36.9


def test_plan_override_replays_keep_counts_at_layers_one_to_s():
    from vtc.methods.llm_base import PlanOverride

    replay = PlanOverride(get("pyramiddrop"), [288, 144, 72])
    assert replay.name == "pyramiddrop"
    assert replay.plan(576, 4, Budget.parse(1.0)) == [Stage(1, 288), Stage(2, 144), Stage(3, 72)]
    with pytest.raises(VTCError, match="3 stages need at least 4 decoder layers"):
        replay.plan(576, 3, Budget.parse(1.0))
    assert get("fastv").describe().startswith("FastV: prune image tokens after layer K-1")


@pytest.mark.parametrize("name, options", [("fastv", {"layer": 9}), ("dart", {"layer": 0}), ("pyramiddrop", {"layers": (0, 2)}),
                                           ("feather", {"layers": (3, 2)}), ("sparsevlm", {"layers": (2, 9)})])
def test_bad_stage_layers_are_refused_naming_the_method(name, options):
    with pytest.raises(VTCError, match=f"^{name}: pruning layers"):
        get(name, **options).plan(64, 4, Budget.parse("auto") if name in ("pyramiddrop", "feather") else Budget.parse(16))
