"""Vision-side method zoo: every method against a naive loop over its formula, plus shared invariants."""

import itertools
import math

import pytest
import torch

from vtc.methods import AttentionSpec, Budget, Origin, Signal, Signals, VTCError, get
from vtc.methods.divprune import divprune_indices

from conftest import random_image

ZOO = ["fastervlm", "visionzip", "divprune", "fopru-rank", "fopru-row", "tome", "evit", "todre", "vispruner", "holov"]
QUESTIONS = ["what color is the small circle ?", "is there a red square ?", "how many shapes ?"]


def fake_signals(batch=2, n=36, d=8, seed=0, grid=(6, 6)):
    g = torch.Generator().manual_seed(seed)
    return Signals(
        features=torch.randn(batch, n, d, generator=g),
        grid=grid,
        cls_attn=torch.rand(batch, n, generator=g).softmax(-1),
        keys=torch.randn(batch, n, 4, generator=g),
        projected=torch.randn(batch, n, 12, generator=g),
        received_attn=torch.rand(batch, n, generator=g),
        cls_feature=torch.randn(batch, d, generator=g),
        cls_attn_shallow=torch.rand(batch, n, generator=g).softmax(-1),
    )


def cos_dist(a, b):
    return 1.0 - float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# ----------------------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("budget", [1, 7, 18, 0.25, 36])
def test_every_budget_is_exact_and_every_patch_owned_once(name, budget):
    sig = fake_signals()
    for sel in get(name).select(sig, budget):
        assert sel.num_tokens == Budget.parse(budget).tokens(36)
        assert len(sel.sources) == sel.num_tokens == sel.origin.numel()
        for j, src in enumerate(sel.sources):  # a patch owned by token j is one of j's sources
            owned = (sel.owner == j).nonzero().squeeze(1)
            assert set(owned.tolist()) <= set(src.tolist())
        drawn = torch.cat([torch.empty(0, dtype=torch.long)] + list(sel.sources))
        assert set((sel.owner >= 0).nonzero().squeeze(1).tolist()) == set(drawn.tolist())


@pytest.mark.parametrize("name", ZOO)
def test_kept_tokens_are_the_patch_features(name):
    sig = fake_signals(batch=1)
    [sel] = get(name).select(sig, 9)
    for j, o in enumerate(sel.origin.tolist()):
        if o == Origin.KEPT:
            torch.testing.assert_close(sel.tokens[j], sig.features[0, int(sel.sources[j][0])])


@pytest.mark.parametrize("name", ZOO + ["downsample"])
def test_budget_larger_than_n_and_auto_are_refused(name):
    sig = fake_signals(batch=1)
    with pytest.raises(VTCError, match="more than"):
        get(name).select(sig, 37)
    with pytest.raises(VTCError, match="auto"):
        get(name).select(sig, "auto")


@pytest.mark.parametrize("name, bad", [("visionzip", {"contextual": "sum"}), ("divprune", {"space": "pixels"}), ("tome", {"metric": "x"}), ("evit", {"order": "x"}), ("todre", {"objective": "x"}), ("prumerge", {"order": "x"}), ("prumerge+", {"neighbours": 0}), ("prumerge", {"neighbours": 2.5})])
def test_bad_options_are_named(name, bad):
    with pytest.raises(VTCError, match=name):
        get(name, **bad)


# ----------------------------------------------------------------------------- per-method formulas


def naive_top(scores, k):
    ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[:k])


def test_fastervlm_keeps_top_cls_attention_in_raster_order():
    sig = fake_signals()
    for b, sel in enumerate(get("fastervlm").select(sig, 10)):
        assert sel.kept_indices().tolist() == naive_top(sig.cls_attn[b], 10)


def test_fopru_rank_and_row_follow_the_received_attention():
    sig = fake_signals(batch=1)
    s = sig.received_attn[0]
    [rank] = get("fopru-rank").select(sig, 10)
    assert rank.kept_indices().tolist() == naive_top(s, 10)
    [row] = get("fopru-row").select(sig, 15)  # 6 columns: 2 whole rows + the 3 best patches of the 3rd best row
    row_sums = [float(s[r * 6 : r * 6 + 6].sum()) for r in range(6)]
    rows = sorted(range(6), key=lambda r: -row_sums[r])
    expected = [r * 6 + c for r in rows[:2] for c in range(6)]
    expected += [rows[2] * 6 + c for c in naive_top(s[rows[2] * 6 : rows[2] * 6 + 6], 3)]
    assert row.kept_indices().tolist() == sorted(expected)


def test_visionzip_matches_a_loop_over_the_official_steps():
    sig = fake_signals(batch=1, n=36)
    x, a, k = sig.features[0], sig.cls_attn[0], sig.keys[0]
    [sel] = get("visionzip").select(sig, 16)
    dominant = round(16 * 54 / 64)  # 14: CLS + 13 patches; 2 contextual
    kept = naive_top(a, dominant - 1)
    remaining = [i for i in range(36) if i not in kept]
    step = max(1, len(remaining) // 2)
    targets = [remaining[p] for p in range(0, len(remaining), step)][:2]
    members = {t: [] for t in targets}
    for i in remaining:
        if i not in targets:
            sims = [float(torch.nn.functional.cosine_similarity(k[i], k[t], dim=0)) for t in targets]
            members[targets[sims.index(max(sims))]].append(i)
    expected = [sig.cls_feature[0]] + [x[i] for i in kept]
    expected += [x[t] + (sum(x[m] for m in members[t]) / max(1, len(members[t]))) for t in targets]
    torch.testing.assert_close(sel.tokens, torch.stack(expected))
    assert sel.origin[0] == Origin.GLOBAL and sel.counts()["merged"] == 2
    assert sel.info == {"dominant": 14, "contextual": 2}
    for budget, split in [(64, (54, 10)), (128, (108, 20)), (192, (162, 30))]:  # the paper's settings
        from vtc.methods.visionzip import split_budget

        assert split_budget(budget) == split


def naive_greedy_maxmin(vectors, k, first):
    n = len(vectors)
    chosen = [first]
    while len(chosen) < k:
        best, best_d = None, -1.0
        for j in range(n):
            if j in chosen:
                continue
            d = min(cos_dist(vectors[j], vectors[s]) for s in chosen)
            if d > best_d + 1e-9:
                best, best_d = j, d
        chosen.append(best)
    return sorted(chosen)


def test_divprune_matches_a_naive_greedy_loop():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(12, 5, generator=g)
    nn_dist = [min(cos_dist(v[j], v[i]) for i in range(12) if i != j) for j in range(12)]
    first = max(range(12), key=lambda j: nn_dist[j])
    for k in (1, 3, 6, 11):
        assert divprune_indices(v, k).tolist() == naive_greedy_maxmin(v, k, first)


def test_divprune_finds_the_brute_force_optimum_on_clustered_tokens():
    # four tight clusters of three tokens: the best 4-subset takes one per cluster
    centers = torch.eye(4, 6) * 3
    g = torch.Generator().manual_seed(0)
    v = torch.cat([c + 0.05 * torch.randn(3, 6, generator=g) for c in centers])
    picks = divprune_indices(v, 4).tolist()
    min_d = lambda s: min(cos_dist(v[i], v[j]) for i, j in itertools.combinations(s, 2))  # noqa: E731
    best = max(itertools.combinations(range(12), 4), key=min_d)
    assert math.isclose(min_d(picks), min_d(best), rel_tol=1e-6)
    assert sorted(p // 3 for p in picks) == [0, 1, 2, 3]


def test_divprune_reads_projected_tokens_by_default():
    sig = fake_signals(batch=1)
    [sel] = get("divprune").select(sig, 8)
    assert sel.kept_indices().tolist() == divprune_indices(sig.projected[0], 8).tolist()
    [sel_f] = get("divprune", space="features").select(sig, 8)
    assert sel_f.kept_indices().tolist() == divprune_indices(sig.features[0], 8).tolist()


def test_todre_greedy_starts_at_the_top_cls_patch():
    sig = fake_signals(batch=1)
    x, seed = sig.features[0], int(sig.cls_attn[0].argmax())
    [sel] = get("todre").select(sig, 7)
    assert sel.kept_indices().tolist() == naive_greedy_maxmin(x, 7, seed)
    [sel_sum] = get("todre", objective="maxsum").select(sig, 5)
    chosen = [seed]
    while len(chosen) < 5:
        rest = [j for j in range(36) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (sum(cos_dist(x[j], x[s]) for s in chosen), -j)))
    assert sel_sum.kept_indices().tolist() == sorted(chosen)


def test_evit_fuses_the_rest_weighted_by_attention():
    sig = fake_signals(batch=1)
    x, a = sig.features[0], sig.cls_attn[0]
    [sel] = get("evit").select(sig, 6)
    kept = naive_top(a, 5)
    rest = [i for i in range(36) if i not in kept]
    fused = sum(float(a[i]) * x[i] for i in rest)
    torch.testing.assert_close(sel.tokens, torch.stack([x[i] for i in kept] + [fused]))
    [by_score] = get("evit", order="score").select(sig, 6)
    assert by_score.kept_indices().tolist() == sorted(kept, key=lambda i: -float(a[i]))


def naive_tome_round(x, m, size, groups, r):
    """One bipartite round written as loops over the alternating sets."""
    A, B = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = {}
    for i in A:
        sims = [float(torch.nn.functional.cosine_similarity(m[i], m[j], dim=0)) for j in B]
        best[i] = (max(sims), B[sims.index(max(sims))])
    src = sorted(A, key=lambda i: -best[i][0])[:r]
    out_x, out_m, out_s, out_g = {}, {}, {}, {}
    for j in B:
        pair = [j] + [i for i in src if best[i][1] == j]
        total = sum(size[p] for p in pair)
        out_x[j] = sum(x[p] * size[p] for p in pair) / total
        out_m[j] = sum(m[p] * size[p] for p in pair) / total
        out_s[j], out_g[j] = total, sorted(sum((groups[p] for p in pair), []))
    unm = [i for i in sorted(A, key=lambda i: -best[i][0]) if i not in src]
    order_x = [x[i] for i in unm] + [out_x[j] for j in B]
    order_m = [m[i] for i in unm] + [out_m[j] for j in B]
    return order_x, order_m, [size[i] for i in unm] + [out_s[j] for j in B], [groups[i] for i in unm] + [out_g[j] for j in B]


def test_tome_matches_looped_bipartite_rounds_and_size_weighted_means():
    sig = fake_signals(batch=1, n=20, grid=(4, 5))
    x, k = sig.features[0], sig.keys[0]
    [sel] = get("tome").select(sig, 6)  # rounds: 20 -> 10 -> 6
    xs, ms, sizes, groups = list(x), list(k), [1.0] * 20, [[i] for i in range(20)]
    while len(xs) > 6:
        xs, ms, sizes, groups = naive_tome_round(xs, ms, sizes, groups, min(len(xs) - 6, len(xs) // 2))
    expected = {tuple(g): v for g, v in zip(groups, xs)}
    got = {tuple(sorted(s.tolist())): t for s, t in zip(sel.sources, sel.tokens)}
    assert got.keys() == expected.keys()
    for g, v in got.items():
        torch.testing.assert_close(v, expected[g])
        torch.testing.assert_close(v, x[list(g)].mean(0))  # size-weighted averaging = mean of the original patches
    # output order: untouched patches in raster order, then merged tokens by their first patch
    singles = sorted(g[0] for g in expected if len(g) == 1)
    merged = sorted((g for g in expected if len(g) > 1), key=min)
    assert [s.tolist() for s in sel.sources] == [[i] for i in singles] + [list(g) for g in merged]
    assert [o for o in sel.origin.tolist()] == [Origin.KEPT] * len(singles) + [Origin.MERGED] * len(merged)


def test_tome_on_features_needs_no_keys_and_matches_the_loop():
    sig = fake_signals(batch=1, n=20, grid=(4, 5))
    method = get("tome", metric="features")
    assert method.needs == frozenset({Signal.FEATURES})
    sig.keys = None  # the adapter computes only what `needs` names
    [sel] = method.select(sig, 7)  # rounds: 20 -> 10 -> 7
    x = sig.features[0]
    xs, ms, sizes, groups = list(x), list(x), [1.0] * 20, [[i] for i in range(20)]
    while len(xs) > 7:
        xs, ms, sizes, groups = naive_tome_round(xs, ms, sizes, groups, min(len(xs) - 7, len(xs) // 2))
    got = {tuple(sorted(s.tolist())): t for s, t in zip(sel.sources, sel.tokens)}
    assert got.keys() == {tuple(g) for g in groups}
    for g, v in zip(groups, xs):
        torch.testing.assert_close(got[tuple(g)], v)


# ----------------------------------------------------------------------------- on the model


def test_received_attention_and_cls_feature_match_eager(tiny_pipe, tiny_dirs):
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0], attn_implementation="eager").eval()
    pixels = tiny_pipe.prepare([random_image(i) for i in range(2)], QUESTIONS[:2])["pixel_values"]
    for heads in ("mean", "sum"):
        sig = tiny_pipe.adapter.signals(
            pixels, frozenset({Signal.FEATURES, Signal.RECEIVED_ATTN, Signal.CLS_ATTN, Signal.CLS_FEATURE}), AttentionSpec(layer=-2, heads=heads)
        )
        with torch.no_grad():
            out = eager.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        probs = out.attentions[-2][:, :, 1:, 1:]  # patch queries x patch keys, softmax over all keys
        expected = probs.mean(2)
        expected = expected.mean(1) if heads == "mean" else expected.sum(1)
        torch.testing.assert_close(sig.received_attn, expected, atol=1e-5, rtol=1e-5)
        cls_row = out.attentions[-2][:, :, 0, 1:]
        torch.testing.assert_close(sig.cls_attn, cls_row.mean(1) if heads == "mean" else cls_row.sum(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sig.cls_feature, out.hidden_states[-2][:, 0], atol=1e-5, rtol=1e-5)


def test_downsample_features_equal_the_stock_tower_on_the_smaller_image(tiny_pipe):
    pixels = tiny_pipe.prepare([random_image(4)], QUESTIONS[:1])["pixel_values"]  # 4x4 patch grid
    method = get("downsample")
    assert method.input_grid(Budget.parse(4), (4, 4)) == (2, 2)
    assert method.input_grid(Budget.parse(5), (4, 4)) == (3, 3)
    sig = tiny_pipe.adapter.signals(pixels, method.needs, method.attention, grid=(2, 2))
    small = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bilinear", antialias=True)
    with torch.no_grad():
        out = tiny_pipe.model.model.vision_tower(small, interpolate_pos_encoding=True, output_hidden_states=True)
    torch.testing.assert_close(sig.features, out.hidden_states[-2][:, 1:], atol=1e-5, rtol=1e-5)
    [sel] = method.select(sig, 4)
    torch.testing.assert_close(sel.tokens, sig.features[0])
    # each small cell covers a 2x2 block of the full 4x4 grid
    assert [s.tolist() for s in sel.sources] == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(VTCError, match="resolution"):
        get("downsample+text")


@pytest.mark.parametrize("name", ZOO + ["downsample", "fastervlm+text"])
def test_runs_end_to_end_on_a_batch(tiny_pipe, name):
    imgs = [random_image(i + 20) for i in range(3)]
    for budget in (5, 0.5):
        results = tiny_pipe(imgs, QUESTIONS, method=name, budget=budget, max_new_tokens=2)
        assert [r.tokens_after for r in results] == [Budget.parse(budget).tokens(16)] * 3
        assert all(r.selection.num_patches == 16 for r in results)


def test_divprune_never_picks_a_token_twice_when_the_rest_are_duplicates():
    # three directions, each twice: after one of each is chosen every remaining token is at distance 0 from the set,
    # the same score a chosen token has to itself; the picks must still be 5 distinct tokens covering all 3 directions.
    v = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).repeat(2, 1)  # token i has direction i % 3
    for k in (4, 5, 6):
        picks = divprune_indices(v, k).tolist()
        assert len(set(picks)) == k
        assert {p % 3 for p in picks} == {0, 1, 2}
    sig = Signals(features=v[None], grid=(2, 3), projected=v[None].half())  # fp16 projector output, as on GPU
    [sel] = get("divprune").select(sig, 5)
    assert len(set(sel.kept_indices().tolist())) == 5


# ----------------------------------------------------------------------------- ties, worked by hand
# Equal scores must break the same way on every run and device: the lower index first. torch's unstable sort
# reorders ties from 17 elements on, so these cases are at least that long.


def test_evit_score_order_breaks_ties_by_lower_index():
    sig = fake_signals(batch=1)
    sig.cls_attn = torch.full((1, 36), 1 / 37)
    [sel] = get("evit", order="score").select(sig, 6)
    assert sel.kept_indices().tolist() == [0, 1, 2, 3, 4]
    assert sel.sources[-1].tolist() == list(range(5, 36))


def test_fopru_row_breaks_ties_by_lower_row():
    sig = fake_signals(batch=1, n=40, grid=(20, 2))
    sig.received_attn = torch.full((1, 40), 0.5)
    [sel] = get("fopru-row").select(sig, 5)  # rows 0 and 1 whole, then the first patch of row 2
    assert sel.kept_indices().tolist() == [0, 1, 2, 3, 4]


def test_tome_merges_tied_pairs_in_index_order():
    # patches 2i and 2i+1 share the one-hot metric e_i: every A token has similarity exactly 1 to its partner, 0 else.
    sig = fake_signals(batch=1, n=40, grid=(20, 2))
    sig.keys = torch.eye(20).repeat_interleave(2, dim=0)[None]
    [sel] = get("tome").select(sig, 30)  # one round, r = 10: the first ten A tokens (0, 2, ..., 18) merge
    assert sel.kept_indices().tolist() == list(range(20, 40))
    assert [s.tolist() for s in sel.sources[20:]] == [[2 * i, 2 * i + 1] for i in range(10)]
    x = sig.features[0]
    torch.testing.assert_close(sel.tokens[20:], torch.stack([(x[2 * i] + x[2 * i + 1]) / 2 for i in range(10)]))


@pytest.mark.parametrize("objective", ["maxmin", "maxsum"])
def test_todre_never_picks_a_token_twice_when_the_rest_are_duplicates(objective):
    # three directions, each twice, seed = patch 0. Max-sum by hand: after 0 the sums are 0 (direction 0) or 1, pick 1;
    # then 2; then every unchosen token sums to 2 and each chosen one (to itself 0) to 2 as well: only exclusion
    # stops a chosen token from being picked again.
    v = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).repeat(2, 1)
    cls = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    sig = Signals(features=v[None], grid=(2, 3), cls_attn=cls)
    for k in (4, 5, 6):
        [sel] = get("todre", objective=objective).select(sig, k)
        assert sel.kept_indices().tolist() == list(range(k))


def test_greedy_primitives_return_index_tensors():
    from vtc.methods.primitives import greedy_max_min, greedy_max_sum

    distance = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 0.5, 0.0]])
    for greedy, expected in ((greedy_max_min, [0, 2, 1]), (greedy_max_sum, [0, 2, 1])):
        picks = greedy(distance, 3, 0)
        assert picks.dtype == torch.long and picks.tolist() == expected


def naive_visionzip(sig, dominant, count, keep_cls=True, mean=False):
    """The official steps as loops: (tokens, sources) for one image."""
    x, a, k = sig.features[0], sig.cls_attn[0], sig.keys[0]
    n = x.shape[0]
    kept = naive_top(a, dominant - 1 if keep_cls else dominant)
    remaining = [i for i in range(n) if i not in kept]
    targets = [remaining[p] for p in range(0, len(remaining), max(1, len(remaining) // count))][:count] if count else []
    members = {t: [] for t in targets}
    for i in remaining:
        if targets and i not in targets:
            sims = [float(torch.nn.functional.cosine_similarity(k[i], k[t], dim=0)) for t in targets]
            members[targets[sims.index(max(sims))]].append(i)
    tokens = ([sig.cls_feature[0]] if keep_cls else []) + [x[i] for i in kept]
    sources = ([[]] if keep_cls else []) + [[i] for i in kept]
    for t in targets:
        group = members[t]
        if mean:
            tokens.append(sum((x[m] for m in group), x[t]) / (len(group) + 1))
        else:
            tokens.append(x[t] + sum((x[m] for m in group), torch.zeros_like(x[t])) / max(1, len(group)))
        sources.append([t] + group)
    return torch.stack(tokens), sources


@pytest.mark.parametrize(
    "budget,options,split",
    [
        (16, {}, (14, 2)),  # round(16 * 54/64) = round(13.5) = 14
        (30, {"dominant_share": 0.2}, (6, 24)),  # 31 remaining, step max(1, 31 // 24) = 1: many targets own 0 or 1
        (12, {"keep_cls": False}, (10, 2)),  # round(10.125) = 10 patches, no CLS token
        (16, {"contextual": "mean"}, (14, 2)),
        (3, {}, (3, 0)),  # round(2.53) = 3: no contextual token
        (4, {"dominant_share": 0.1}, (1, 3)),  # round(0.4) = 0 -> at least 1 (the CLS token alone)
    ],
)
def test_visionzip_options_match_the_loop(budget, options, split):
    sig = fake_signals(batch=1, n=36, seed=5)
    [sel] = get("visionzip", **options).select(sig, budget)
    assert sel.info == {"dominant": split[0], "contextual": split[1]}
    tokens, sources = naive_visionzip(sig, *split, keep_cls=options.get("keep_cls", True), mean=options.get("contextual") == "mean")
    assert [s.tolist() for s in sel.sources] == sources
    torch.testing.assert_close(sel.tokens, tokens)


# ----------------------------------------------------------------------------- downsample, worked by hand


def test_downsample_input_grid_by_hand():
    method = get("downsample")
    assert method.input_grid(Budget.parse(5), (4, 6)) == (3, 3)  # ceil(sqrt(5)) = 3
    assert method.input_grid(Budget.parse(0.5), (6, 4)) == (4, 4)  # 12 of 24 -> ceil(sqrt(12)) = 4
    assert method.input_grid(Budget.parse(16), (4, 4)) is None  # the tower's own grid
    assert method.input_grid(Budget.parse(10), (4, 4)) is None  # ceil(sqrt(10)) = 4: full grid, pooled to 10
    assert method.input_grid(Budget.parse(20), (4, 6)) is None  # 5 x 5 does not fit in 4 rows: full grid, pooled


def test_downsample_pools_a_3x3_tower_output_to_5_tokens_by_hand():
    # Full grid 4 x 6, budget 5: the tower ran at 3 x 3. Pool layout for 5 on 3 x 3: row bands [0, 2) with 3 columns
    # and [1, 3) with 2 columns (adaptive-pooling edges), i.e. small cells {0,3} {1,4} {2,5} {3,4,6,7} {4,5,7,8}.
    # Small row r covers full rows [floor(4r/3), ceil(4(r+1)/3)) = [0,2) [1,3) [2,4); small column c covers full
    # columns [2c, 2c+2).
    feats = torch.arange(27, dtype=torch.float32).reshape(1, 9, 3)  # 3 wide: fewer channels than tokens
    sig = Signals(features=feats, grid=(3, 3), source_grid=(4, 6))
    [sel] = get("downsample").select(sig, 5)
    cells = [[0, 3], [1, 4], [2, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    torch.testing.assert_close(sel.tokens, torch.stack([feats[0, c].mean(0) for c in cells]))
    patches = lambda rows, cols: sorted(r * 6 + c for r in rows for c in cols)  # noqa: E731
    assert [s.tolist() for s in sel.sources] == [
        patches(range(0, 3), range(0, 2)),
        patches(range(0, 3), range(2, 4)),
        patches(range(0, 3), range(4, 6)),
        patches(range(1, 4), range(0, 4)),
        patches(range(1, 4), range(2, 6)),
    ]
    assert sel.owner.tolist() == [0, 0, 1, 1, 2, 2] * 3 + [3, 3, 3, 3, 4, 4]  # the first token to draw on a patch
    assert (sel.origin == Origin.MERGED).all() and sel.info == {"input_grid": [3, 3]}


def test_downsample_at_full_resolution_pools_or_keeps_by_hand():
    feats = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0))
    sig = Signals(features=feats, grid=(4, 4))  # no resize: source_grid is None
    [sel] = get("downsample").select(sig, 10)
    # 10 on 4 x 4: 3 row bands [0,2) [1,3) [2,4) of 3, 4, 3 columns (the wider band in the middle)
    cells = [[0, 1, 4, 5], [1, 2, 5, 6], [2, 3, 6, 7], [4, 8], [5, 9], [6, 10], [7, 11],
             [8, 9, 12, 13], [9, 10, 13, 14], [10, 11, 14, 15]]
    assert [s.tolist() for s in sel.sources] == cells
    torch.testing.assert_close(sel.tokens, torch.stack([feats[0, c].mean(0) for c in cells]))
    [full] = get("downsample").select(sig, 16)
    assert (full.origin == Origin.KEPT).all() and full.kept_indices().tolist() == list(range(16))
    torch.testing.assert_close(full.tokens, feats[0])


# ----------------------------------------------------------------------------- baselines and options


def test_random_seed_default_and_per_image_offset():
    sig = fake_signals(batch=2)
    first, second = get("random", seed=5).select(sig, 10)
    assert second.kept_indices().tolist() == get("random", seed=6).select(sig, 10)[0].kept_indices().tolist()
    assert get("random").select(sig, 10)[0].kept_indices().tolist() == get("random", seed=0).select(sig, 10)[0].kept_indices().tolist()


def test_pool_at_the_full_budget_keeps_every_patch():
    sig = fake_signals(batch=1)
    [sel] = get("pool").select(sig, 36)
    assert (sel.origin == Origin.KEPT).all() and sel.kept_indices().tolist() == list(range(36))
    torch.testing.assert_close(sel.tokens, sig.features[0])


def test_divprune_on_features_needs_no_projector_output():
    sig = fake_signals(batch=1)
    method = get("divprune", space="features")
    assert method.needs == frozenset({Signal.FEATURES})
    sig.projected = None
    [sel] = method.select(sig, 8)
    assert sel.kept_indices().tolist() == divprune_indices(sig.features[0], 8).tolist()


def test_cosine_distance_by_hand():
    from vtc.methods.primitives import cosine_distance_matrix

    v = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    h = 1 - 0.5**0.5  # 45 degrees
    expected = torch.tensor([[0, 1, 2, h], [1, 0, 1, h], [2, 1, 0, 2 - h], [h, h, 2 - h, 0]])
    torch.testing.assert_close(cosine_distance_matrix(v), expected)


def test_pool_layout_never_puts_more_bins_than_columns_in_a_band():
    from vtc.methods.baselines import pooling_layout

    # 33 on 3 x 16: round(sqrt(33 * 3 / 16)) = 2 bands would need 17 bins in one band of 16 columns;
    # ceil(33 / 16) = 3 bands of 11 instead.
    assert pooling_layout(33, (3, 16)) == [11, 11, 11]
    assert pooling_layout(64, (24, 24)) == [8] * 8
    assert pooling_layout(7, (6, 6)) == [2, 3, 2]  # 3 bands (round(sqrt 7)), the wider one in the middle
    sig = fake_signals(batch=1, n=48, grid=(3, 16))
    [sel] = get("pool").select(sig, 33)
    assert len({tuple(s.tolist()) for s in sel.sources}) == 33


def test_visionzip_option_checks_and_needs():
    assert get("visionzip", dominant_share=1.0).select(fake_signals(batch=1), 10)[0].info == {"dominant": 10, "contextual": 0}
    for bad in (0.0, 1.5):
        with pytest.raises(VTCError, match=f"dominant_share must be in \\(0, 1\\], got {bad}"):
            get("visionzip", dominant_share=bad)
    method = get("visionzip", keep_cls=False)
    assert method.needs == frozenset({Signal.FEATURES, Signal.CLS_ATTN, Signal.KEYS})
    sig = fake_signals(batch=1)
    sig.cls_feature = None
    assert method.select(sig, 10)[0].counts()["global"] == 0


def _vision_side_methods():
    from vtc.methods import available
    from vtc.speed import times_selection

    return [name for name in available() if times_selection(get(name))]


@pytest.mark.parametrize("name", _vision_side_methods())
def test_output_tokens_keep_the_features_dtype_in_half_precision(name):
    """On a GPU the tower runs in bf16/fp16 and the projector takes that dtype: every output token, kept,
    merged or global, must come back in the features' dtype (merges may sum in float32 inside)."""
    sig = fake_signals(batch=2)
    g = torch.Generator().manual_seed(3)
    fields = ("features", "cls_attn", "keys", "projected", "received_attn", "cls_feature", "cls_attn_shallow")
    method = get(name)
    per_token = (2, 12) if method.text.per_token else ()  # TextSpec.per_token: (B, N, 2, W)
    half = Signals(**{**{f: getattr(sig, f) for f in ("grid",) + fields}, "text_sim": torch.rand(2, 36, *per_token, generator=g)})
    for field in fields + ("text_sim",):
        setattr(half, field, getattr(half, field).to(torch.bfloat16))
    for budget in [9] + (["auto"] if method.supports_auto else []):
        for sel in method.select(half, budget):
            assert sel.tokens.dtype == torch.bfloat16, (name, budget, sel.counts())
