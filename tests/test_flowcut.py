"""FlowCut against its official code (fixtures from scripts/make_flowcut_fixtures.py), against a naive loop over
the formula, and on its edges (budget 1 and N, equal scores, a flat or peaked CLS row)."""

import math
from pathlib import Path

import pytest
import torch

from vtc.methods.flowcut import flow_score, flowcut_step, layer_flow_signals, layers_left, prune_count

FIXTURES = torch.load(Path(__file__).parent / "fixtures" / "flowcut" / "cases.pt", weights_only=False)


# ----------------------------------------------------------------------------- parity: the official functions


@pytest.mark.parametrize("case", FIXTURES["scores"], ids=lambda c: f"N={c['values'].shape[1]}")
def test_score_equals_official_compute_score(case):
    score = flow_score(case["cls_attn"], case["semantic"], case["values"])
    torch.testing.assert_close(score, case["score"], rtol=1e-5, atol=1e-6)


def test_a_batch_is_scored_row_by_row():
    """Each image's score is normalised over its own patches (the fixtures' official calls are batches of one)."""
    cases = FIXTURES["scores"][:2]  # two inputs of 64 patches
    batch = [torch.cat([c[name] * (1 + i) for i, c in enumerate(cases)]) for name in ("cls_attn", "semantic", "values")]
    score = flow_score(*batch)
    for i, case in enumerate(cases):
        torch.testing.assert_close(score[i], case["score"][0] * (1 + i), rtol=1e-5, atol=1e-6)


def test_prune_count_equals_official_adaptive_prune_ratio():
    """Every seeded row, schedule and target; a batch of three gives the official batch maximum."""
    for case in FIXTURES["counts"]:
        counts = prune_count(case["cls_attn"], case["remaining"], case["target"])
        assert int(counts.max()) == case["count"], (case["remaining"], case["target"])
    assert len({int(c) for c in prune_count(FIXTURES["counts"][-1]["cls_attn"], 4, 8)}) == 3  # the batch differs


def replay(case: dict, check_layers: bool = True) -> torch.Tensor:
    """vtc's steps over the official run's recorded per-layer signals: the original patch index of every
    patch kept after the last layer; each layer's cumulative score and kept set checked on the way."""
    n, k, depth = case["layers"][0]["tokens"] - 1, case["k"], case["feature_layers"]
    original = torch.arange(n).unsqueeze(0)
    cumulative = None
    for index, layer in enumerate(case["layers"][:depth]):
        if original.shape[1] <= k:
            break
        assert layer["tokens"] - 1 == original.shape[1]
        values = layer["value"]
        cumulative, kept = flowcut_step(cumulative, layer["cls_attn"], layer["semantic"], values,
                                        layers_left(depth, index), k)
        if kept is not None:
            original = original.gather(1, kept)
        if check_layers:
            torch.testing.assert_close(cumulative, layer["cumulative"], rtol=1e-5, atol=1e-7)
            if layer["kept"].shape[1] == n + 1:  # nothing pruned yet: the official list still counts the CLS
                assert original.shape[1] == n
            else:
                assert torch.equal(original, layer["kept"])
    return original


@pytest.mark.parametrize("case", FIXTURES["steps"], ids=lambda c: f"N={c['hidden'].shape[1] - 1},K={c['k']},F={c['feature_layers']}")
def test_steps_equal_the_official_layer_loop(case):
    """The official encoder loop over layers whose attention gives seeded signals: per layer the cumulative
    score and the kept patches (count, order, identity), at the end exactly K patches and their rows."""
    kept = replay(case)
    n, k = case["hidden"].shape[1] - 1, case["k"]
    assert kept.shape == (1, k)
    if k < n:
        assert torch.equal(kept, case["kept"])
    rows = case["hidden"][:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, case["hidden"].shape[-1]))
    torch.testing.assert_close(rows, case["features"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- the formula by hand


def naive_rows(layer: dict, tokens: list[int]) -> tuple[list[float], list[float]]:
    """The CLS attention row and the semantic row over ``tokens`` (the first is CLS), heads averaged, CLS
    column dropped: softmax of q_cls . k_t / sqrt(d), and of v_cls . v_t (no scale)."""
    heads, patches = len(layer["q_cls"]), len(tokens) - 1
    cls_row, semantic = [0.0] * patches, [0.0] * patches
    for h in range(heads):
        d = len(layer["q_cls"][h])
        logits = [sum(layer["q_cls"][h][i] * layer["keys"][h][t][i] for i in range(d)) / math.sqrt(d) for t in tokens]
        sims = [sum(layer["values"][h][0][i] * layer["values"][h][t][i] for i in range(d)) for t in tokens]
        for row, raw in ((cls_row, logits), (semantic, sims)):
            top = max(raw)
            weights = [math.exp(x - top) for x in raw]
            for j in range(patches):
                row[j] += weights[j + 1] / sum(weights) / heads
    return cls_row, semantic


def naive_flowcut(layers: list[dict], n: int, k: int, depth: int) -> list[int]:
    """FlowCut's schedule as plain Python over per-layer (q_cls, keys, values) lists indexed by original
    patch (index 0: CLS). Returns the kept original patch indices in raster order."""
    alive = list(range(n))
    cumulative: dict[int, float] = {}
    for index, layer in enumerate(layers[:depth]):
        if len(alive) <= k:
            break
        heads = len(layer["q_cls"])
        cls_row, semantic = naive_rows(layer, [0] + [p + 1 for p in alive])  # CLS then the live patches
        scores = {}
        for j, p in enumerate(alive):
            mean_value = [sum(layer["values"][h][p + 1][i] for h in range(heads)) / heads for i in range(len(layer["q_cls"][0]))]
            scores[p] = (cls_row[j] / sum(cls_row) + semantic[j] / sum(semantic)) * sum(abs(x) for x in mean_value)
            cumulative[p] = scores[p] if index == 0 or p not in cumulative else 0.5 * cumulative[p] + 0.5 * scores[p]
        remaining = depth - 2 - index
        if remaining < 0 or remaining % 2:
            continue
        if remaining == 0:
            pruned = len(alive)
        else:
            prob = [a / sum(cls_row) for a in cls_row]
            entropy = -sum(x * math.log(x) for x in prob if x > 0)
            pruned = round((len(alive) - k) / math.sqrt(remaining) * (1 - (entropy / math.log(len(alive))) ** 2))
        keep = max(len(alive) - pruned, k)
        best = sorted(alive, key=lambda p: (-cumulative[p], p))[:keep]
        alive = sorted(best)
    return alive


def random_layers(g: torch.Generator, n: int, depth: int, heads=2, d=3, sharp=2.5) -> list[dict]:
    """Per layer: the CLS query, and keys/values of CLS + every original patch, per head (as plain lists)."""
    return [{"q_cls": (torch.randn(heads, d, generator=g) * sharp).tolist(),
             "keys": (torch.randn(heads, n + 1, d, generator=g) * sharp).tolist(),
             "values": torch.randn(heads, n + 1, d, generator=g).tolist()} for _ in range(depth)]


def vtc_flowcut(layers: list[dict], n: int, k: int, depth: int) -> list[int]:
    """vtc's functions over the same layers: the live tokens' projections gathered from the full lists."""
    original = torch.arange(n).unsqueeze(0)
    cumulative = None
    for index, layer in enumerate(layers[:depth]):
        if original.shape[1] <= k:
            break
        live = torch.cat([torch.zeros(1, 1, dtype=torch.long), original + 1], dim=1)[0]
        q, keys, values = (torch.tensor(layer[name], dtype=torch.float64) for name in ("q_cls", "keys", "values"))
        signals = layer_flow_signals(q[None], keys[None][:, :, live], values[None][:, :, live])
        cumulative, kept = flowcut_step(cumulative, *signals, layers_left(depth, index), k)
        if kept is not None:
            original = original.gather(1, kept)
    return original[0].tolist()


@pytest.mark.parametrize("n, k, depth, seed", [(12, 3, 7, 0), (12, 1, 5, 1), (9, 4, 9, 2), (16, 15, 6, 3), (10, 10, 4, 4), (8, 2, 2, 5)])
def test_a_naive_loop_over_the_formula(n, k, depth, seed):
    layers = random_layers(torch.Generator().manual_seed(seed), n, depth)
    expected = naive_flowcut(layers, n, k, depth)
    assert len(expected) == k
    assert vtc_flowcut(layers, n, k, depth) == expected


def test_layer_signals_equal_the_rows_by_hand():
    layer = random_layers(torch.Generator().manual_seed(7), 9, 1, heads=3, d=4)[0]
    live = [0, 2, 3, 7, 9]  # CLS and four patches
    cls_row, semantic = naive_rows(layer, live)
    q, keys, values = (torch.tensor(layer[name], dtype=torch.float64) for name in ("q_cls", "keys", "values"))
    got = layer_flow_signals(q[None], keys[None][:, :, live], values[None][:, :, live])
    torch.testing.assert_close(got[0][0], torch.tensor(cls_row, dtype=torch.float64))
    torch.testing.assert_close(got[1][0], torch.tensor(semantic, dtype=torch.float64))
    torch.testing.assert_close(got[2][0], values[:, live[1:]].mean(0))


def test_a_flat_cls_row_prunes_nothing_early_and_a_peaked_one_prunes_much():
    flat = torch.full((1, 64), 1 / 65)
    assert int(prune_count(flat, 4, 8)) == 0
    peaked = torch.zeros(1, 64)
    peaked[0, 5] = 0.9  # one patch takes all: entropy 0, so (M - K) / sqrt(r) are pruned; 0 log 0 counts as 0
    assert int(prune_count(peaked, 4, 8)) == 28
    assert int(prune_count(peaked, 1, 8)) == 56


def test_equal_cumulative_scores_keep_the_lower_positions():
    m = 10
    cls_attn, semantic = torch.full((1, m), 0.1), torch.full((1, m), 0.1)
    values = torch.ones(1, m, 2)
    _, kept = flowcut_step(None, cls_attn, semantic, values, 0, 4)
    assert kept.tolist() == [[0, 1, 2, 3]]


def test_odd_layers_score_without_pruning_and_the_last_step_reaches_the_target():
    g = torch.Generator().manual_seed(0)
    cls_attn, semantic, values = torch.rand(2, 20, generator=g), torch.rand(2, 20, generator=g), torch.randn(2, 20, 4, generator=g)
    cumulative, kept = flowcut_step(None, cls_attn, semantic, values, 3, 5)
    assert kept is None and cumulative.shape == (2, 20)
    _, kept = flowcut_step(cumulative, cls_attn, semantic, values, 0, 5)
    assert kept.shape == (2, 5) and bool((kept.diff(dim=1) > 0).all())


# ----------------------------------------------------------------------------- the whole tower, through the hook


def fixture_tower():
    """The fixture script's seeded tiny CLIP tower (q/k projections sharpened), rebuilt and fingerprinted."""
    from vtc.testing import sharpened_clip_tower

    tower = sharpened_clip_tower(**FIXTURES["tower_config"])
    assert float(sum(p.detach().double().sum() for p in tower.parameters())) == pytest.approx(FIXTURES["fingerprint"], abs=1e-6)
    return tower


@pytest.fixture(scope="module")
def llava_adapter():
    """A tiny LLaVA-1.5 whose vision tower is the fixture's, behind vtc's adapter (feature layer -2)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vtc.models.llava import LlavaAdapter
    from vtc.testing import tiny_parts

    spec = FIXTURES["tower_config"]
    tokenizer, vision, text = tiny_parts(spec["image_size"], spec["patch_size"], spec["layers"], 1, 256)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(fixture_tower().state_dict())
    return LlavaAdapter(model)


def tower_pixels(case: dict) -> torch.Tensor:
    size = FIXTURES["tower_config"]["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(case["seed"]))
    assert float(pixels.sum()) == pytest.approx(case["pixel_sum"])
    return pixels


@pytest.mark.parametrize("case", FIXTURES["tower"], ids=lambda c: f"seed{c['seed']},K={c['k']}")
def test_the_tower_run_equals_the_official_tower(llava_adapter, case):
    """The official patched CLIP (eager attention) against vtc's adapter and hook (SDPA): the kept patches
    (count, order, identity), their feature-layer rows, and provenance (each token one KEPT patch)."""
    from vtc.methods import Origin, get

    [sel], _ = llava_adapter.compress_in_tower(tower_pixels(case), get("flowcut"), case["k"])
    n = llava_adapter.num_patches
    assert sel.num_tokens == case["k"]
    kept = sel.kept_indices()
    if case["k"] < n:
        assert kept.tolist() == case["kept"][0].tolist()
    else:
        assert kept.tolist() == list(range(n))
    torch.testing.assert_close(sel.tokens, case["features"][0], rtol=1e-4, atol=1e-4)
    assert bool((sel.origin == Origin.KEPT).all()) and [s.tolist() for s in sel.sources] == [[i] for i in kept.tolist()]
    assert sorted((sel.owner >= 0).nonzero().squeeze(1).tolist()) == sorted(kept.tolist())


class Recording:
    """Wraps FlowCut's reducer: what it computed in each layer (signals, cumulative score, kept patches)."""

    def __init__(self, reducer):
        self.reducer, self.stage, self.size_bias, self.layers = reducer, reducer.stage, reducer.size_bias, []

    def __call__(self, view):
        step = self.reducer(view)
        signals = layer_flow_signals(view.queries[:, :, 0], view.keys, view.values)
        self.layers.append({"tokens": view.hidden.shape[1], "signals": signals, "cumulative": self.reducer.cumulative,
                            "kept": step})
        return step


@pytest.mark.parametrize("case", [c for c in FIXTURES["tower"] if "cls_attn" in c["layers"][0]], ids=lambda c: f"K={c['k']}")
def test_each_tower_layer_equals_the_official_layer(llava_adapter, case):
    """Layer by layer on the tiny CLIP: the CLS row, semantic row and values vtc reads from the hook's q/k/v,
    the cumulative score and the token count, against the official attention forward's own outputs."""
    from vtc.methods import get
    from vtc.models.tower_loop import run_tower

    adapter = llava_adapter
    recording = Recording(get("flowcut").reducer(case["k"], adapter.num_patches, adapter.feature_index, 1))
    hidden = adapter.embed(tower_pixels(case), False)
    run_tower(adapter.tower.encoder.layers[: adapter.feature_index], hidden, recording, 1, adapter.num_heads)
    official = case["layers"][: adapter.feature_index]
    assert [r["tokens"] for r in recording.layers] == [r["tokens"] for r in official]
    after = [r["tokens"] - 1 for r in official[1:]] + [case["k"]]  # each layer's output: the next one's input
    assert recording.reducer.info["patches_per_layer"] == after
    # once the target is reached nothing more is scored: the last cumulative score is the official one's
    torch.testing.assert_close(recording.reducer.cumulative, official[-1]["cumulative"], rtol=1e-4, atol=1e-6)
    for mine, theirs in zip(recording.layers, official):
        cls_attn, semantic, values = mine["signals"]
        torch.testing.assert_close(cls_attn, theirs["cls_attn"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(semantic, theirs["semantic"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(values, theirs["value"], rtol=1e-4, atol=1e-5)
        if theirs["cumulative"] is not None and mine["tokens"] - 1 > case["k"]:
            torch.testing.assert_close(mine["cumulative"], theirs["cumulative"], rtol=1e-4, atol=1e-6)


def test_a_batch_prunes_every_image_by_the_batchs_largest_count(llava_adapter):
    """The hook keeps one count per batch, as the official code does with a batch: each pruning layer's count
    is the largest over the images (the fewest kept), so a batch keeps at most what each image alone keeps."""
    from vtc.methods import get
    from vtc.models.tower_loop import run_tower

    adapter = llava_adapter
    pixels = torch.cat([tower_pixels(c) for c in FIXTURES["tower"] if c["k"] == 6])
    alone = {c["seed"]: [r["tokens"] for r in c["layers"]] for c in FIXTURES["tower"] if c["k"] == 6}
    recording = Recording(get("flowcut").reducer(6, adapter.num_patches, adapter.feature_index, 1))
    run_tower(adapter.tower.encoder.layers[: adapter.feature_index], adapter.embed(pixels, False), recording, 1, adapter.num_heads)
    batch = [r["tokens"] for r in recording.layers]
    first_prune = next(i for i, t in enumerate(batch) if t < batch[0])
    assert batch[first_prune] == min(counts[first_prune] for counts in alone.values())  # the largest prune count
    assert batch[-1] == 7  # CLS + K at the last layer, for every image
    selections, _ = adapter.compress_in_tower(pixels, get("flowcut"), 6)
    assert [s.num_tokens for s in selections] == [6, 6, 6]


@pytest.mark.parametrize("budget, k", [(1, 1), (5, 5), (0.5, 8), (16, 16)])
def test_runs_end_to_end_with_exact_counts_and_provenance(tiny_pipe, budget, k):
    """Through the pipeline on the tiny LLaVA (3 layers, feature layer -2: pruned once, after layer 0)."""
    from conftest import random_image

    from vtc.methods import Origin

    questions = ["what color is the small circle ?", "is there a red square ?"]
    results = tiny_pipe([random_image(30), random_image(31)], questions, method="flowcut", budget=budget, max_new_tokens=2)
    for r in results:
        assert r.tokens_after == k and r.selection.num_patches == 16
        assert bool((r.selection.origin == Origin.KEPT).all())
        kept = r.selection.kept_indices()
        assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == k  # raster order, distinct
        assert r.selection.owner[kept].tolist() == list(range(k))


def test_bad_configurations_and_budgets_are_refused(llava_adapter):
    from vtc.methods import Signals, VTCError, get

    method = get("flowcut")
    with pytest.raises(VTCError, match="CLS"):
        method.reducer(8, 64, 7, 0)  # a SigLIP-like tower: no CLS
    with pytest.raises(VTCError, match="no layer is left"):
        method.reducer(8, 64, 1, 1)
    with pytest.raises(VTCError, match="more than"):
        method.reducer(65, 64, 7, 1)
    with pytest.raises(VTCError, match="auto"):
        method.reducer("auto", 64, 7, 1)
    with pytest.raises(VTCError, match="flowcut"):
        get("flowcut+text")
    with pytest.raises(VTCError, match="inside the vision tower"):
        method.select(Signals(features=torch.zeros(1, 4, 2), grid=(2, 2)), 2)
    with pytest.raises(VTCError, match="NaN"):
        llava_adapter.compress_in_tower(torch.full((1, 3, 64, 64), float("nan")), method, 4)
