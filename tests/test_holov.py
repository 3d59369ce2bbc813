"""HoloV against the official code (fixtures), an independent loop over its rule, and hand-worked cases.

The fixtures come from scripts/make_holov_fixtures.py, which ran both official ``HoloV`` functions
(llava/model/utils.py and qwen-model-HoloV/utils.py) and the official crop-count rule, loaded at run time
from a snapshot of https://github.com/obananas/HoloV.
"""

import math
from pathlib import Path

import pytest
import torch

from vtc.methods import Signal, Signals, VTCError, get

from conftest import random_image

FIXTURES = Path(__file__).parent / "fixtures" / "holov" / "cases.pt"


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURES)


def signals_of(vectors: torch.Tensor, attention: torch.Tensor, features: torch.Tensor | None = None) -> Signals:
    """The official function takes the projected tokens and returns them: vtc's features and projected alike."""
    return Signals(features=vectors if features is None else features, grid=(1, vectors.shape[1]),
                   cls_attn=attention, projected=vectors)


def run_setting(case, k, crops, is_rule):
    sig = signals_of(case["vectors"].float(), case["attention"])
    method = get("holov") if is_rule else get("holov", crops=crops)
    return sig, method.select(sig, k)


# ----------------------------------------------------------------------------- parity with the official code


def test_matches_the_official_selection_where_it_fills_the_budget(official):
    """Same tokens in the same order (crop after crop, highest attention first), same rows, same crop count."""
    compared = 0
    for case in official["cases"]:
        for (k, crops, is_rule), positions in zip(case["settings"], case["positions"]):
            sig, selections = run_setting(case, k, crops, is_rule)
            for b, sel in enumerate(selections):
                expected = positions[b].long()
                if (expected < 0).any():
                    continue  # padded by the official code: the next test
                assert sel.kept_indices().tolist() == expected.tolist(), (case["n"], case["seed"], k, crops, b)
                assert sel.info["crops"] == min(crops, case["n"])  # empty crops (C > N) are skipped
                torch.testing.assert_close(sel.tokens, sig.features[b, expected], atol=1e-4, rtol=0)
                compared += 1
    assert compared >= 350


def test_where_the_official_code_pads_vtc_keeps_its_tokens_and_fills_the_budget(official):
    """The official code loses a crop's excess quota and pads zero rows; vtc keeps every official token, K distinct."""
    compared = 0
    for case in official["cases"]:
        for (k, crops, is_rule), positions in zip(case["settings"], case["positions"]):
            _, selections = run_setting(case, k, crops, is_rule)
            for b, sel in enumerate(selections):
                expected = positions[b].long()
                if not (expected < 0).any():
                    continue
                kept = sel.kept_indices().tolist()
                assert len(kept) == len(set(kept)) == k
                assert set(expected[expected >= 0].tolist()) < set(kept), (case["n"], case["seed"], k, crops, b)
                compared += 1
    assert compared >= 100


def test_matches_the_official_tower_attention_and_rows(official):
    """vtc's LLaVA adapter (SDPA, the CLS row from layer -2's q/k) on the official run's tiny CLIP: the official
    selection (its eager-attention CLSVisionTower, encode_images, HoloV with an identity projector), row for row."""
    from test_vispruner import tiny_llava_with
    from vtc.models.llava import LlavaAdapter

    tower = official["tower"]
    adapter = LlavaAdapter(tiny_llava_with(tower["config"], tower["state"]))
    method = get("holov", space="features")  # the official similarities were taken on the identity projection
    sig = adapter.signals(tower["pixel_values"].float(), method.needs, method.attention)
    for (k, crops, _), positions, rows in zip(tower["settings"], tower["positions"], tower["rows"]):
        for b, sel in enumerate(method.select(sig, k)):
            assert sel.kept_indices().tolist() == positions[b].tolist(), (k, b)
            assert sel.info["crops"] == crops
            torch.testing.assert_close(sel.tokens, rows[b].float(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- an independent loop over the rule


def naive_holov(attention, vectors, k, crops="auto", beta=0.09, tau=1.0, rank="attention"):
    """The official rule on Python lists, with the paper's repair of overflow and shortfall (vtc's exact count)."""
    n = len(attention)
    c = max(1, int(1024 / 576 * n / k)) if crops == "auto" else crops
    c = min(c, n)
    runs, start = [], 0
    for p in range(c):
        size = n // c + (1 if p < n % c else 0)
        runs.append(list(range(start, start + size)))
        start += size
    scores, holistic = [], {}
    for run in runs:
        m = len(run)
        if m == 1:
            scores.append(attention[run[0]])
            holistic[run[0]] = 1000 * attention[run[0]]
            continue
        unit = []
        for i in run:
            norm = math.sqrt(sum(v * v for v in vectors[i])) + 1e-6
            unit.append([v / norm for v in vectors[i]])
        variance = []
        for a in range(m):
            sims = [0.0 if a == b else sum(x * y for x, y in zip(unit[a], unit[b])) for b in range(m)]
            mu = sum(sims) / (m - 1)
            variance.append(sum((s - mu) ** 2 for s in sims) / (m - 1))
        scaled = [1000 * attention[i] for i in run]
        gamma = (sum(abs(s) for s in scaled) / m) / (sum(abs(v) for v in variance) / m + 1e-6)
        h = [s + beta * gamma * v for s, v in zip(scaled, variance)]
        holistic.update(zip(run, h))
        scores.append(sum(h) / m)
    power = [s**tau for s in scores]
    weights = [p / (sum(power) + 1e-6) for p in power]
    quota = [math.floor(w * k) for w in weights]
    by_weight = sorted(range(c), key=lambda p: (-weights[p], p))
    for p in by_weight[: max(0, k - sum(quota))]:
        quota[p] += 1
    sizes = [len(r) for r in runs]
    while True:  # the paper's repair
        quota = [min(q, s) for q, s in zip(quota, sizes)]
        missing = k - sum(quota)
        if missing <= 0:
            break
        room = [s - q for q, s in zip(quota, sizes)]
        priority = [max(w, 0.0) * r for w, r in zip(weights, room)]
        if sum(priority) <= 0:
            priority = [float(r) for r in room]
        extra = [math.floor(missing * p / sum(priority)) for p in priority]
        best = max((p for p in range(c) if room[p] > 0), key=lambda p: (weights[p], -p))
        quota = [q + e for q, e in zip(quota, extra)]
        quota[best] += missing - sum(extra)
    kept = []
    for run, q in zip(runs, quota):
        if q == len(run):
            kept += run
        else:
            key = holistic if rank == "holistic" else attention
            kept += sorted(run, key=lambda i: (-key[i], i))[:q]
    return kept


def tiny_inputs(seed, batch=2, n=13, d=3, sharpness=3.0):
    g = torch.Generator().manual_seed(seed)
    attention = (sharpness * torch.randn(batch, n, generator=g, dtype=torch.float64)).softmax(-1)
    return torch.randn(batch, n, d, generator=g, dtype=torch.float64), attention


@pytest.mark.parametrize("n", [13, 16])
def test_every_budget_and_crop_count_matches_a_naive_loop(n):
    vectors, attention = tiny_inputs(n, n=n)
    sig = signals_of(vectors, attention)
    for crops in ["auto", 1, 3, 5, n, n + 3]:  # 3 and 5 do not divide 13 or 16; n + 3 leaves crops empty
        for k in range(1, n + 1):
            for b, sel in enumerate(get("holov", crops=crops).select(sig, k)):
                expected = naive_holov(attention[b].tolist(), vectors[b].tolist(), k, crops)
                assert sel.kept_indices().tolist() == expected, (crops, k, b)


def test_options_match_the_naive_loop():
    vectors, attention = tiny_inputs(5, n=24, sharpness=0.5)  # flat: few crops reach their cap, tau shows
    sig = signals_of(vectors, attention)
    for options in [{"rank": "holistic"}, {"rank": "holistic", "beta": 2.0, "crops": 2}, {"beta": 3.0}, {"tau": 4.0}, {"beta": 0.0, "crops": 4}]:
        for k in (2, 5, 9, 12):
            for b, sel in enumerate(get("holov", **options).select(sig, k)):
                expected = naive_holov(attention[b].tolist(), vectors[b].tolist(), k, **options)
                assert sel.kept_indices().tolist() == expected, (options, k, b)
    for b, sel in enumerate(get("holov", order="raster").select(sig, 6)):
        assert sel.kept_indices().tolist() == sorted(naive_holov(attention[b].tolist(), vectors[b].tolist(), 6))


# ----------------------------------------------------------------------------- hand-worked and edge cases


def test_budget_one_keeps_the_top_attention_and_budget_n_keeps_everything_in_order():
    vectors, attention = tiny_inputs(7, n=20)
    sig = signals_of(vectors, attention)
    for b, sel in enumerate(get("holov").select(sig, 1)):  # 35 crops of one token: weights = attention
        assert sel.kept_indices().tolist() == [int(attention[b].argmax())]
    for sel in get("holov").select(sig, 20):
        assert sel.kept_indices().tolist() == list(range(20))


def test_equal_scores_share_the_budget_evenly_lower_crops_and_indices_first():
    """12 identical tokens of equal attention in 4 crops of 3: four equal weights s / (4 s + 1e-6), just under 1/4.
    K = 4: floor(4 w) = 0 everywhere, the 4 left go one per crop. K = 6: floor(6 w) = 1 each, the 2 left go to
    crops 0 and 1 (ties: the lower crop). In each crop the lowest indices (ties: lower index first)."""
    sig = signals_of(torch.ones(1, 12, 3), torch.full((1, 12), 1 / 12))
    [four] = get("holov", crops=4).select(sig, 4)
    assert four.kept_indices().tolist() == [0, 3, 6, 9] and four.info["quotas"] == [1, 1, 1, 1]
    [six] = get("holov", crops=4).select(sig, 6)
    assert six.kept_indices().tolist() == [0, 1, 3, 4, 6, 9] and six.info["quotas"] == [2, 2, 1, 1]


def test_the_diversity_term_cancels_in_the_crop_scores_as_the_official_code_computes_them():
    """By hand from step 4: gamma_c = mean|1000 a| / (mean V + 1e-6) and V >= 0, so mean_c(beta gamma_c V) =
    beta mean_c(1000 a) up to the 1e-6: every crop score is (1 + beta) 1000 mean_c(a), and the quotas are those
    of the attention alone (beta = 0). The variance only matters when ranking by H inside a crop (rank='holistic')."""
    vectors, attention = tiny_inputs(11, n=40, d=5)
    sig = signals_of(vectors, attention)
    for k in (3, 8, 13, 25):
        for crops in ("auto", 6):
            official = [s.info["quotas"] for s in get("holov", crops=crops).select(sig, k)]
            attention_only = [s.info["quotas"] for s in get("holov", crops=crops, beta=0.0).select(sig, k)]
            strong = [s.info["quotas"] for s in get("holov", crops=crops, beta=50.0).select(sig, k)]
            assert official == attention_only == strong, (k, crops)


def test_holistic_ranking_prefers_the_token_of_highest_similarity_variance():
    """One crop of 4: u0 = u1 = (1, 0), u2 = (-1, 0), u3 = (0, 1). Row 0's similarities (diagonal zeroed) are
    0, 1, -1, 0: mu = 0, V = 2/3; row 3's are all 0: V = 0. gamma = 250 / mean V = 250 / (23/54) = 587; with
    beta = 1, H0 = 240 + 587 * 2/3 = 631 > H3 = 280, while token 3 has the most attention."""
    vectors = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])
    sig = signals_of(vectors, torch.tensor([[0.24, 0.24, 0.24, 0.28]]))
    [by_attention] = get("holov", crops=1, beta=1.0).select(sig, 1)
    [holistic] = get("holov", crops=1, beta=1.0, rank="holistic").select(sig, 1)
    assert by_attention.kept_indices().tolist() == [3] and holistic.kept_indices().tolist() == [0]


def test_a_one_token_crop_scores_its_raw_attention_as_the_official_code_does():
    """N = 4, K = 2: int(1024/576 * 4 / 2) = 3 crops of sizes 2, 1, 1. The two one-token crops score their raw
    attention (no factor 1000), so the two-token crop takes both tokens although token 3 has most attention."""
    sig = signals_of(torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([[0.1, 0.1, 0.1, 0.7]]))
    [sel] = get("holov").select(sig, 2)
    assert sel.info["crops"] == 3 and sel.kept_indices().tolist() == [0, 1]


def test_a_crop_over_its_quota_gives_the_surplus_to_the_others():
    """8 tokens, 2 crops of 4, K = 6, crop 0 holds nearly all attention: its quota floor(6 w0) + 1 = 6 exceeds its 4
    tokens (the official code would pad 2 zero rows); the 2 go to crop 1, its two highest-attention tokens."""
    attention = torch.tensor([[0.3, 0.2, 0.25, 0.24, 0.001, 0.004, 0.002, 0.003]])
    sig = signals_of(torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(1)), attention)
    [sel] = get("holov", crops=2).select(sig, 6)
    assert sel.info["quotas"] == [4, 2]
    assert sel.kept_indices().tolist() == [0, 1, 2, 3, 5, 7]


def test_reads_the_projected_tokens_unless_told_features():
    vectors, attention = tiny_inputs(3, batch=1, n=16, d=4)
    features = torch.randn(1, 16, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sig = signals_of(vectors, attention, features=features)
    assert Signal.PROJECTED in get("holov").needs and Signal.PROJECTED not in get("holov", space="features").needs
    options = dict(crops=2, beta=5.0, rank="holistic")  # the vectors only act through the variance, ranked by H
    [projected] = get("holov", **options).select(sig, 5)
    [on_features] = get("holov", space="features", **options).select(sig, 5)
    assert projected.kept_indices().tolist() == naive_holov(attention[0].tolist(), vectors[0].tolist(), 5, **options)
    assert on_features.kept_indices().tolist() == naive_holov(attention[0].tolist(), features[0].tolist(), 5, **options)
    assert projected.kept_indices().tolist() != on_features.kept_indices().tolist()
    torch.testing.assert_close(projected.tokens, features[0, projected.kept_indices()])  # output rows: the features


def test_layer_option_sets_the_attention_layer():
    assert get("holov").attention.layer == -2 and get("holov", layer=-1).attention.layer == -1


@pytest.mark.parametrize("bad", [{"crops": 0}, {"crops": 2.5}, {"crops": "many"}, {"beta": -1}, {"beta": float("nan")},
                                 {"tau": 0}, {"rank": "cls"}, {"order": "random"}, {"space": "pixels"}, {"layer": "last"}])
def test_bad_options_are_named(bad):
    with pytest.raises(VTCError, match=f"holov: {next(iter(bad))}"):
        get("holov", **bad)


def test_negative_attention_is_refused():
    sig = signals_of(torch.randn(1, 8, 3), torch.tensor([[0.5, -0.1, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]]))
    with pytest.raises(VTCError, match="non-negative"):
        get("holov").select(sig, 3)


def test_holov_plus_text_runs_end_to_end(tiny_pipe):
    results = tiny_pipe([random_image(31), random_image(32)], ["is there a red square ?", "how many shapes ?"],
                        method="holov+text", budget=5, max_new_tokens=2)
    assert [r.tokens_after for r in results] == [5, 5]
