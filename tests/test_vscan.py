"""VScan: the vision stage against the official code's fixtures and a naive loop, the in-LLM stage against
eager attention and masking, the budget split, the composition in the pipeline and the shallow CLS signal."""

import math
from pathlib import Path

import pytest
import torch

from vtc.methods import AttentionSpec, Budget, Origin, Signal, Signals, VTCError, get
from vtc.methods.llm_base import average_tokens
from vtc.methods.vscan import VScanMiddleLayer
from vtc.models.llm_prune import InLLMPruner

from conftest import random_image
from test_in_llm import QUESTIONS, spliced

FIXTURES = torch.load(Path(__file__).parent / "fixtures" / "vscan" / "cases.pt")


def anchors(sel):
    """The retained patch of every output token: the first of its sources."""
    starts = sel.source_sizes.cumsum(0) - sel.source_sizes
    return sel.source_index[starts]


# ----------------------------------------------------------------------------- parity with the official code


def test_llava_vision_stage_matches_the_official_encode_images():
    """Official LLaVA-1.5 rule (24 x 24, 6 x 6 windows, identity projector): kept patches and merged rows."""
    worst, compared = 0.0, 0
    for case in FIXTURES["llava"]:
        features = case["features"].float()
        sig = Signals(features=features, grid=(24, 24), projected=features,
                      cls_attn=case["deep"].mean(1), cls_attn_shallow=case["shallow"].mean(1))
        for t, mask, rows in zip(case["budgets"], case["masks"], case["rows"]):
            for b, sel in enumerate(get("vscan").scan_and_merge(sig, t)):
                assert anchors(sel).tolist() == mask[b].nonzero().squeeze(1).tolist(), (case["seed"], t, b)
                torch.testing.assert_close(sel.tokens, rows[b], atol=1e-4, rtol=0)
                worst = max(worst, float((sel.tokens - rows[b]).abs().max()))
                compared += 1
    assert compared == 20 and worst < 1e-5


def test_official_llava_rule_keeps_fewer_than_t_where_vtc_keeps_t():
    """T = 100: the local share 50 is not a multiple of the 16 windows; the official code keeps 16 * 3 + 50."""
    assert {(s["t"], tuple(s["kept"])) for s in FIXTURES["shortfalls"]} == {(100, (98, 98))}
    case = FIXTURES["llava"][0]
    sig = Signals(features=case["features"].float(), grid=(24, 24), projected=case["features"].float(),
                  cls_attn=case["deep"].mean(1), cls_attn_shallow=case["shallow"].mean(1))
    assert [s.num_tokens for s in get("vscan").scan_and_merge(sig, 100)] == [100, 100]


def test_any_grid_matches_the_official_qwen_window_rule():
    """Grids of any size (leftover rows/columns in the last window), budgets the 16 windows do not divide."""
    worst, compared = 0.0, 0
    for case in FIXTURES["grid"]:
        features = case["features"].float()[None]
        sig = Signals(features=features, grid=tuple(case["grid"]), projected=features,
                      cls_attn=case["global"][None], cls_attn_shallow=case["local"][None])
        for t, kept, rows in zip(case["budgets"], case["kept"], case["rows"]):
            [sel] = get("vscan", window=case["window"]).scan_and_merge(sig, t)
            assert anchors(sel).tolist() == kept.tolist(), (case["grid"], case["seed"], t)
            torch.testing.assert_close(sel.tokens, rows, atol=1e-4, rtol=0)
            worst = max(worst, float((sel.tokens - rows).abs().max()))
            compared += 1
    assert compared == 20 and worst < 1e-5


# ----------------------------------------------------------------------------- the paper's formula, looped


def naive_vscan(shallow, deep, vectors, features, grid, t, window):
    """Plain loops: per-window top-k of the shallow map (k = (t // 2) / windows), top of the deep map among the
    rest, then every other patch into its most cosine-similar retained patch; means."""
    h, w = grid
    windows = [(r, c) for r in range(h // window) for c in range(w // window)]
    k = (t // 2) // len(windows)
    local = []
    for r, c in windows:
        cells = [(r * window + y) * w + c * window + x for y in range(window) for x in range(window)]
        local += sorted(cells, key=lambda i: (-float(shallow[i]), i))[:k]
    rest = [i for i in range(h * w) if i not in local]
    glob = sorted(rest, key=lambda i: (-float(deep[i]), i))[: t - len(local)]
    retained = sorted(local + glob)
    groups = {j: [j] for j in retained}
    for i in range(h * w):
        if i in groups:
            continue
        cos = [float(torch.dot(vectors[i], vectors[j]) / (vectors[i].norm() * vectors[j].norm())) for j in retained]
        groups[retained[cos.index(max(cos))]].append(i)
    return retained, [sum(features[i] for i in groups[j]) / len(groups[j]) for j in retained], groups


@pytest.mark.parametrize("t", [8, 16, 24, 36])  # local shares that the 4 windows divide
def test_matches_a_naive_loop_over_the_scans_and_merging(t):
    g = torch.Generator().manual_seed(t)
    grid, n = (6, 6), 36
    features, projected = torch.randn(1, n, 5, generator=g), torch.randn(1, n, 7, generator=g)
    shallow, deep = torch.rand(1, n, generator=g), torch.rand(1, n, generator=g)
    sig = Signals(features=features, grid=grid, projected=projected, cls_attn=deep, cls_attn_shallow=shallow)
    [sel] = get("vscan", window=3).scan_and_merge(sig, t)
    retained, rows, groups = naive_vscan(shallow[0], deep[0], projected[0], features[0], grid, t, 3)
    assert anchors(sel).tolist() == retained
    torch.testing.assert_close(sel.tokens, torch.stack(rows), atol=1e-6, rtol=1e-6)
    for j, src in zip(retained, sel.sources):  # provenance: the retained patch, then its joiners in raster order
        assert src.tolist() == [j] + sorted(groups[j][1:])
    assert sel.origin.tolist() == [Origin.KEPT if len(groups[j]) == 1 else Origin.MERGED for j in retained]
    assert sorted(torch.cat(sel.sources).tolist()) == list(range(n))  # every patch in exactly one token
    for token, src in enumerate(sel.sources):
        assert (sel.owner[src] == token).all()


def test_features_space_assigns_by_the_tower_features():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(1, 36, 5, generator=g)
    sig = Signals(features=features, grid=(6, 6), projected=torch.randn(1, 36, 7, generator=g),
                  cls_attn=torch.rand(1, 36, generator=g), cls_attn_shallow=torch.rand(1, 36, generator=g))
    [sel] = get("vscan", window=3, space="features").scan_and_merge(sig, 8)
    _, rows, _ = naive_vscan(sig.cls_attn_shallow[0], sig.cls_attn[0], features[0], features[0], (6, 6), 8, 3)
    torch.testing.assert_close(sel.tokens, torch.stack(rows), atol=1e-6, rtol=1e-6)
    assert get("vscan", space="features").needs == {Signal.FEATURES, Signal.CLS_ATTN, Signal.CLS_ATTN_SHALLOW}


def test_edges_budget_one_all_patches_and_equal_scores():
    features = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0))
    flat = torch.ones(2, 16)
    sig = Signals(features=features, grid=(4, 4), projected=features, cls_attn=flat, cls_attn_shallow=flat)
    method = get("vscan", window=2)
    everything = method.scan_and_merge(sig, 16)  # T = N: every patch kept as it is
    assert all((s.origin == Origin.KEPT).all() and anchors(s).tolist() == list(range(16)) for s in everything)
    torch.testing.assert_close(everything[0].tokens, features[0])
    # equal scores: the lower index wins, in each window (local) and overall (global)
    [one] = method.scan_and_merge(Signals(features=features[:1], grid=(4, 4), projected=features[:1],
                                          cls_attn=flat[:1], cls_attn_shallow=flat[:1]), 1)
    assert anchors(one).tolist() == [0] and one.num_tokens == 1 and one.origin.tolist() == [Origin.MERGED]
    [four] = method.scan_and_merge(Signals(features=features[:1], grid=(4, 4), projected=features[:1],
                                           cls_attn=flat[:1], cls_attn_shallow=flat[:1]), 8)
    # local: one per 2 x 2 window, first in index order (0, 2, 8, 10); global: the lowest other indices (1, 3, 4, 5)
    assert anchors(four).tolist() == [0, 1, 2, 3, 4, 5, 8, 10]


# ----------------------------------------------------------------------------- the budget split


@pytest.mark.parametrize("average, vision, llm", [(64, 96, 32), (128, 192, 64), (192, 288, 96), (10, 15, 5), (3, 5, 2), (1, 2, 1)])
def test_a_layer_average_splits_as_the_official_scripts(average, vision, llm):
    """K = 64 is the scripts' 96 before the LLM and 32 from layer 16 of 32: an average of 64 over the layers."""
    method = get("vscan")
    assert method.vision_tokens(Budget.parse(average), 576) == vision
    [stage] = method.llm_stage.plan(vision, 32, Budget.parse("auto"))
    assert (stage.layer, stage.keep) == (16, llm)
    if average % 2 == 0:
        assert average_tokens([stage], vision, 32) == average


def test_ratio_budget_and_refusals_name_the_problem():
    method = get("vscan")
    assert method.vision_tokens(Budget.parse(0.111), 576) == round(1.5 * 64)  # round(0.111 * 576) = 64
    sig = Signals(features=torch.randn(1, 36, 4), grid=(6, 6), projected=torch.randn(1, 36, 4),
                  cls_attn=torch.rand(1, 36), cls_attn_shallow=torch.rand(1, 36))
    assert method.select(sig, 24)[0].num_tokens == 36 and method.select(sig, 0.5)[0].num_tokens == 27
    with pytest.raises(VTCError, match="vscan: a layer average of 25 tokens needs 38 .* the most it can average is 24"):
        method.select(sig, 25)
    row = Signals(features=torch.randn(1, 37, 4), grid=(1, 37), projected=torch.randn(1, 37, 4),
                  cls_attn=torch.rand(1, 37), cls_attn_shallow=torch.rand(1, 37))
    with pytest.raises(VTCError, match="needs 38 tokens .* more than the image's 37 patches"):  # one over: refused
        method.select(row, 25)
    with pytest.raises(VTCError, match="auto"):
        method.select(sig, "auto")
    with pytest.raises(VTCError, match="cls_attn_shallow"):
        method.select(Signals(features=sig.features, grid=(6, 6), projected=sig.projected, cls_attn=sig.cls_attn), 8)
    for bad, pattern in [({"space": "x"}, "space"), ({"llm_keep": 0}, "llm_keep"), ({"window": 0}, "window"),
                         ({"local_share": 2}, "local_share"), ({"layer": 2.5}, "layer")]:
        with pytest.raises(VTCError, match="vscan: " + pattern):
            get("vscan", **bad)
    with pytest.raises(VTCError, match="pruning layers"):
        VScanMiddleLayer(layer=4).plan(30, 4, Budget.parse("auto"))


# ----------------------------------------------------------------------------- in the LLM and in the pipeline


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    from vtc.pipeline import Pipeline
    from vtc.testing import save_tiny_llava

    path = save_tiny_llava(tmp_path_factory.mktemp("vscan") / "llava", image_size=64, text_layers=4)
    return Pipeline.from_pretrained(path), path


def test_middle_layer_keeps_the_top_eager_attention_rows_and_pruning_equals_masking(deep):
    """Before layer 2 of 4: the last prompt token's attention in layer 2 (eager, output_attentions) ranks the 64
    image tokens; the top 21 stay. The pruned forward equals the full one with the other image tokens masked."""
    from transformers import LlavaForConditionalGeneration

    pipe, path = deep
    images = [random_image(i + 50, size=(50, 60)) for i in range(2)]
    ids, mask, feats = spliced(pipe, images, QUESTIONS[:2])
    lm = pipe.model.model.language_model
    stage = VScanMiddleLayer()
    with torch.no_grad():
        with InLLMPruner(lm, stage, Budget.parse("auto"), ids, mask, pipe.adapter.image_token_id) as pruner:
            pruned = pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats)
        eager = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
        attn = eager(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats, output_attentions=True).attentions[2]
    image = ids == pipe.adapter.image_token_id
    kept = torch.zeros_like(mask, dtype=torch.bool)
    for b in range(2):
        rows = pruner.rows.index[b][pruner.rows.valid[b]]
        kept[b, rows] = True
        positions = image[b].nonzero().squeeze(1)
        scores = attn[b, :, -1, positions].mean(0)
        top = sorted(range(64), key=lambda i: (-float(scores[i]), i))[:21]
        assert sorted(positions[top].tolist()) == [p for p in rows.tolist() if image[b, p]]
    assert pruner.kept_counts() == [21, 21]
    length = ids.shape[1]
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None] & (kept & mask.bool())[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool)[None]

    def hide(module, args, kwargs):
        return args, {**kwargs, "attention_mask": allowed[:, None]}

    handles = [layer.register_forward_pre_hook(hide, with_kwargs=True) for layer in lm.layers[2:]]
    try:
        with torch.no_grad():
            reference = pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=feats)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(pruned.logits[:, -1], reference.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_pipeline_runs_both_stages_from_one_budget(deep):
    pipe, _ = deep
    images = [random_image(i + 60, size=(50, 60)) for i in range(3)]
    results = pipe(images, QUESTIONS[:3], method="vscan", budget=16, max_new_tokens=3)
    for r in results:  # 64 patches: 24 tokens enter the LLM, 8 stay from layer 2 of 4: 16 per layer on average
        assert (r.tokens_after, r.selection.info["llm_kept"], r.selection.info["llm_average_tokens"]) == (24, 8, 16)
        assert r.method == "vscan" and r.budget == "16" and r.selection.info["vision_tokens"] == 24
    singles = [pipe([im], [q], method="vscan", budget=16, max_new_tokens=3)[0] for im, q in zip(images, QUESTIONS)]
    assert [r.text for r in results] == [s.text for s in singles]
    with pytest.raises(VTCError, match="already prunes inside the LLM"):
        pipe(images[:1], QUESTIONS[:1], method="vscan>fastv", budget="16>4")
    with pytest.raises(VTCError, match="no dropped patch to recover"):
        get("vscan+text")


def test_shallow_cls_attention_is_the_eager_cls_row_of_its_layer(tiny_pipe, tiny_dirs):
    """ceil(0.25 * 3) - 1 = layer 0 of the tiny 3-layer tower (CLIP-L's 24: layer 5); deep stays at -2."""
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0], attn_implementation="eager").eval()
    pixels = tiny_pipe.prepare([random_image(i) for i in range(2)], QUESTIONS[:2])["pixel_values"]
    with torch.no_grad():
        out = eager.model.vision_tower(pixels, output_attentions=True)
    for share, layer in [(0.25, 0), (0.5, 1), (1.0, 2)]:
        sig = tiny_pipe.adapter.signals(pixels, frozenset({Signal.FEATURES, Signal.CLS_ATTN, Signal.CLS_ATTN_SHALLOW}),
                                        AttentionSpec(layer=-2, shallow=share))
        torch.testing.assert_close(sig.cls_attn_shallow, out.attentions[layer][:, :, 0, 1:].mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sig.cls_attn, out.attentions[-2][:, :, 0, 1:].mean(1), atol=1e-5, rtol=1e-5)
    assert math.ceil(0.25 * 24) - 1 == 5  # the official attentions[5] on CLIP-L
    plain = tiny_pipe.adapter.signals(pixels, frozenset({Signal.FEATURES, Signal.CLS_ATTN}), AttentionSpec())
    assert plain.cls_attn_shallow is None  # computed only when declared


def test_speed_times_both_stages_and_charges_each_layer_its_tokens(tiny_dirs, tmp_path):
    """16 patches, budget 4 (a 32-layer average): 6 tokens enter the LLM, 2 stay from layer 16 of 32."""
    from transformers import LlavaForConditionalGeneration

    from vtc.cost import Shape, request_cost, staged_cost
    from vtc.speed import SpeedBench, cost_rows, run_speed
    from vtc.testing import save_tiny_llava

    model = LlavaForConditionalGeneration.from_pretrained(save_tiny_llava(tmp_path / "llava4", text_layers=4)).eval()
    bench = SpeedBench(text_tokens=6, decode_tokens=1, model=model)
    _, results = run_speed(["vscan"], ["4"], 4, 1, 6, 1, bench=bench, select_batches=(1,))
    row = {r["method"]: r for r in results}["vscan"]
    assert [tuple(s) for s in row["stages"]] == [(16, 2)]
    assert row["tokens"] == (16 * 6 + 16 * 2) / 32  # the layer average: 4
    full = request_cost(bench.shape, 16, 6)["total_prefill_flops"]
    ours = staged_cost(bench.shape, 6, [(16, 2)], 6, projected_tokens=6)["total_prefill_flops"]
    assert row["flops_ratio"] == round(full / ours, 3)
    # without a model (vtc speed --cost-only): LLaVA-1.5-7B's shape, the scripts' 96 -> 32 at layer 16
    from vtc.shapes import llava15_config

    rows, _ = cost_rows(["vscan"], ["64"], Shape.from_config(llava15_config()), 40, select_batches=(1,), reps=1)
    [vscan] = [r for r in rows if r["method"] == "vscan"]
    assert [tuple(s) for s in vscan["stages"]] == [(16, 32)] and vscan["tokens"] == 64
