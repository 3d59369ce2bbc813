"""PruMerge(+), pool, random, none against naive re-computations."""

import numpy as np
import pytest
import torch

from vtc.methods import Budget, Origin, Signals, VTCError, get
from vtc.methods.prumerge import NEIGHBOURS

N, D = 64, 6


def signals(seed=0, batch=1, n=N, grid=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n, generator=g) * 1.5
    attn = logits.exp() / (1 + logits.exp().sum(-1, keepdim=True))
    return Signals(torch.randn(batch, n, D, generator=g), grid, attn, torch.randn(batch, n, 5, generator=g))


def test_iqr_count_matches_numpy_percentiles():
    s = signals(seed=1)
    a = s.cls_attn[0].numpy()
    q1, q3 = np.percentile(a, [25, 75])
    k = int((a > q3 + 1.5 * (q3 - q1)).sum())
    [sel] = get("prumerge").select(s, "auto")
    assert sel.info["kept_before_merge"] == max(1, k)
    assert sel.num_tokens == max(1, k) + 1  # plus the extra token


def naive_prumerge(s, kept):
    x, keys, a = s.features[0], s.keys[0], s.cls_attn[0]
    out = []
    for i in kept:
        sims = []
        for j in range(N):
            if j != i:
                sims.append((float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0)), j))
        nbrs = [j for _, j in sorted(sims, reverse=True)[:NEIGHBOURS]]
        tok = x[i].clone()
        for j in nbrs:
            tok += a[j] * x[j]
        out.append(tok)
    pruned = [j for j in range(N) if j not in set(kept)]
    out.append(sum(a[j] * x[j] for j in pruned))
    return torch.stack(out)


@pytest.mark.parametrize("budget", ["auto", 10])
def test_merge_equals_naive_loop(budget):
    s = signals(seed=2)
    [sel] = get("prumerge").select(s, budget)
    k = sel.info["kept_before_merge"]
    kept = s.cls_attn[0].argsort(descending=True)[:k].tolist()  # descending score order, as the official code
    assert [int(src[0]) for src in sel.sources[:k]] == kept
    torch.testing.assert_close(sel.tokens, naive_prumerge(s, kept), rtol=1e-5, atol=1e-6)
    assert (sel.owner >= 0).all()


def naive_neighbours(keys, i):
    sims = sorted(((float(torch.nn.functional.cosine_similarity(keys[i], keys[j], dim=0)), j) for j in range(len(keys)) if j != i), reverse=True)
    return [j for _, j in sims[:NEIGHBOURS]]


@pytest.mark.parametrize("budget", ["auto", 10, 3])
def test_owner_map_kept_first_then_the_first_kept_token_absorbing_it_then_the_extra_token(budget):
    """Every patch in a batch of 3: a kept patch owns itself; a pruned patch belongs to the first kept token
    (output order) whose neighbours take it, else to the extra token of all pruned patches (which is
    built around no patch: it claims no patch before the kept tokens do)."""
    s = signals(seed=5, batch=3)
    for b, sel in enumerate(get("prumerge").select(s, budget)):
        k = sel.info["kept_before_merge"]
        kept = [int(src[0]) for src in sel.sources[:k]]
        expected = [-1] * N
        for t, i in enumerate(kept):
            expected[i] = t
        for t, i in enumerate(kept):
            for j in naive_neighbours(s.keys[b], i):
                expected[j] = t if expected[j] < 0 else expected[j]
        expected = [k if o < 0 else o for o in expected]
        assert sel.owner.tolist() == expected


def test_raster_order_option():
    s = signals(seed=2)
    [sel] = get("prumerge", order="raster").select(s, 10)
    anchors = [int(src[0]) for src in sel.sources[:9]]
    assert anchors == sorted(anchors)


def outlier_signals(n, grid, outliers):
    """Flat CLS attention (0.010 .. 0.012) with the given {patch: score} outliers far above Q3 + 1.5 IQR."""
    attn = torch.zeros(1, n)
    background = [i for i in range(n) if i not in outliers]
    attn[0, background] = torch.linspace(0.010, 0.012, len(background))
    for i, score in outliers.items():
        attn[0, i] = score
    g = torch.Generator().manual_seed(0)
    return Signals(torch.randn(1, n, D, generator=g), grid, attn, torch.randn(1, n, 5, generator=g))


# The official rule (clip_encoder.py, token_prune_merge_advanced_plus): ratio = k / 576, step = int(1 / ratio),
# uniform picks = arange(0, 575, int(step / 3)) not already in the top-k, appended after the top-k list.
# Worked by hand below; the code is not consulted for the stride.


def test_prumerge_plus_uniform_picks_on_an_8x8_grid_by_hand():
    # 4 outliers of 64: step = 64 / 4 = 16, stride = int(16 / 3) = 5 -> 0, 5, 10, ..., 60; 5 and 20 are top-k already.
    s = outlier_signals(64, (8, 8), {20: 0.20, 33: 0.15, 5: 0.10, 62: 0.08})
    [plus] = get("prumerge+").select(s, "auto")
    anchors = [int(src[0]) for src in plus.sources[:-1]]
    assert anchors == [20, 33, 5, 62] + [0, 10, 15, 25, 30, 35, 40, 45, 50, 55, 60]
    assert plus.num_tokens == 16  # 15 kept + the extra token
    [plain] = get("prumerge").select(s, "auto")
    assert [int(src[0]) for src in plain.sources[:-1]] == [20, 33, 5, 62]
    # 3 outliers: step = int(64 / 3) = 21, stride 7 -> 0, 7, ..., 56; the official range stops before the last patch
    # (arange(0, 575) on 576), so 63 = 9 * 7 is not picked.
    s = outlier_signals(64, (8, 8), {20: 0.20, 33: 0.15, 62: 0.08})
    [plus] = get("prumerge+").select(s, "auto")
    assert [int(src[0]) for src in plus.sources[:-1]] == [20, 33, 62] + [0, 7, 14, 21, 28, 35, 42, 49, 56]


def test_prumerge_plus_uniform_picks_on_llava_grid_by_hand():
    # 5 outliers of 576: step = int(576 / 5) = int(115.2) = 115, stride = int(115 / 3) = 38 -> 0, 38, ..., 570.
    s = outlier_signals(576, (24, 24), {100: 0.5, 38: 0.4, 400: 0.3, 574: 0.2, 76: 0.1})
    [plus] = get("prumerge+").select(s, "auto")
    uniform = [0, 114, 152, 190, 228, 266, 304, 342, 380, 418, 456, 494, 532, 570]  # 38 and 76 are top-k
    assert [int(src[0]) for src in plus.sources[:-1]] == [100, 38, 400, 574, 76] + uniform


@pytest.mark.parametrize(
    "total,kept",
    [
        # auto would keep 4 top + 11 uniform = 15. Budget T keeps T-1 = `slots` before merging, k = round(slots * 4/15)
        # top picks, then the uniform grid of stride int(64 / k) // 3 without them, thinned evenly or topped up by score.
        (9, [20, 33, 0, 10, 30, 40, 50, 60]),  # k = round(2.13) = 2, stride 10: 0, 10, 20, ..., 60 minus 20
        (6, [20, 0, 21, 42, 33]),  # k = round(1.33) = 1, stride 21: 0, 21, 42; one slot left -> next by score, 33
        (4, [20, 0, 42]),  # k = round(0.8) = 1, stride 21: 0, 21, 42 thinned evenly to 2 -> 0, 42
    ],
)
def test_prumerge_plus_fixed_budget_split_by_hand(total, kept):
    s = outlier_signals(64, (8, 8), {20: 0.20, 33: 0.15, 5: 0.10, 62: 0.08})
    [sel] = get("prumerge+").select(s, total)
    assert [int(src[0]) for src in sel.sources[:-1]] == kept
    assert sel.num_tokens == total


def test_prumerge_plus_fixed_budget_with_stride_one_by_hand():
    # 4x4, one outlier (7): auto keeps 7 + uniform 0, 5, 10 (stride int(16 / 1) // 3 = 5) = 4 slots, 1 of them top.
    # T = 12 -> 11 slots, k = round(11 * 1/4) = 3 top picks: 7, then the largest background scores 15, 14.
    # stride int(16 / 3) // 3 = 1: 0..14 minus 7, 14 = 13 picks, thinned evenly to 8: positions round(i * 12/7)
    # = 0, 2, 3, 5, 7, 9, 10, 12 of [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13] -> 0, 2, 3, 5, 8, 10, 11, 13.
    s = outlier_signals(16, (4, 4), {7: 0.2})
    [sel] = get("prumerge+").select(s, 12)
    assert [int(src[0]) for src in sel.sources[:-1]] == [7, 15, 14, 0, 2, 3, 5, 8, 10, 11, 13]


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
def test_flat_attention_keeps_one_token_not_zero_or_all(name):
    # no score lies above Q3 + 1.5 IQR = the common value: the official count is 0, vtc keeps 1 (ties: lowest index).
    # PruMerge+ adds stride int(64 / 1) // 3 = 21: 0, 21, 42, of which 0 is already kept.
    s = outlier_signals(64, (8, 8), {})
    s.cls_attn = torch.full((1, 64), 1 / 65)
    [sel] = get(name).select(s, "auto")
    assert [int(src[0]) for src in sel.sources[:-1]] == ([0] if name == "prumerge" else [0, 21, 42])


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
@pytest.mark.parametrize("budget", [1, 2, 16, 40, 0.3])
def test_fixed_budgets_exact(name, budget):
    for sel in get(name).select(signals(seed=4, batch=2), budget):
        assert sel.num_tokens == Budget.parse(budget).tokens(N)
        assert len(set(int(src[0]) for src in sel.sources[: sel.info["kept_before_merge"]])) == sel.info["kept_before_merge"]


def test_pool_equals_adaptive_avg_pool_when_the_grid_factors():
    s = signals(n=576, grid=(24, 24))
    [sel] = get("pool").select(s, 64)
    grid = s.features[0].T.reshape(1, D, 24, 24)
    expected = torch.nn.functional.adaptive_avg_pool2d(grid, (8, 8)).reshape(D, 64).T
    torch.testing.assert_close(sel.tokens, expected)
    assert all(len(src) == 9 for src in sel.sources)
    assert sorted(torch.cat(sel.sources).tolist()) == list(range(576))  # a partition
    assert (sel.origin == Origin.MERGED).all()


@pytest.mark.parametrize("budget", [1, 7, 13, 31, 63])
def test_pool_honours_awkward_budgets_with_means_of_its_sources(budget):
    s = signals()
    [sel] = get("pool").select(s, budget)
    assert sel.num_tokens == budget
    for token, src in zip(sel.tokens, sel.sources):
        torch.testing.assert_close(token, s.features[0][src].mean(0))
    assert (sel.owner >= 0).all()


def test_random_is_seeded_sorted_and_differs_per_image():
    s = signals(batch=2)
    a = get("random").select(s, 10)
    b = get("random").select(s, 10)
    assert [x.kept_indices().tolist() for x in a] == [x.kept_indices().tolist() for x in b]
    assert a[0].kept_indices().tolist() != a[1].kept_indices().tolist()
    assert a[0].kept_indices().tolist() == sorted(a[0].kept_indices().tolist())
    assert get("random", seed=5).select(s, 10)[0].kept_indices().tolist() != a[0].kept_indices().tolist()
    assert (a[0].owner >= 0).sum() == 10


def test_none_keeps_everything_and_refuses_smaller_budgets():
    s = signals()
    [sel] = get("none").select(s, "auto")
    torch.testing.assert_close(sel.tokens, s.features[0])
    assert get("none").select(s, 1.0)[0].num_tokens == N
    with pytest.raises(VTCError, match="keeps all"):
        get("none").select(s, 10)


def test_auto_refused_where_there_is_no_dynamic_rule():
    for name in ("random", "pool"):
        with pytest.raises(VTCError, match="auto"):
            get(name).select(signals(), "auto")


def test_unknown_method_and_bad_options():
    with pytest.raises(VTCError, match="unknown method 'fastest'"):
        get("fastest")
    with pytest.raises(VTCError, match="does not take options"):
        get("random", speed=3)


def test_text_recovery_composes_with_any_pruning_method():
    s = signals(seed=6)
    s.text_sim = torch.zeros(1, N)
    s.text_sim[0, [5, 6, 13]] = 1.0
    [sel] = get("random+text").select(s, 12)
    assert sel.num_tokens == 12
    kept = sel.kept_indices().tolist()
    assert kept == sorted(kept)
    recovered = [i for i, o in zip(kept, sel.origin.tolist()) if o == Origin.RECOVERED]
    assert set(recovered) <= {5, 6, 13} and recovered
    with pytest.raises(VTCError, match="merges every patch"):
        get("pool+text").select(s, 12)


def test_merge_on_a_grid_smaller_than_the_neighbour_count():
    # 16 patches < 32 neighbours: each kept token absorbs every other patch, a_j-weighted (the paper's sum, by loop)
    s = outlier_signals(16, (4, 4), {7: 0.2, 9: 0.1})
    x, a = s.features[0], s.cls_attn[0]
    [sel] = get("prumerge").select(s, 3)  # keeps 7 and 9, plus the extra token
    for token, src, i in zip(sel.tokens, sel.sources, (7, 9)):
        assert sorted(src.tolist()) == list(range(16)) and int(src[0]) == i
        torch.testing.assert_close(token, x[i] + sum(a[j] * x[j] for j in range(16) if j != i))


class _KeepMergeAndGlobal:
    """A user's own base method (registered nowhere): a global token, the top cls-attention patches, and two
    merged tokens: patches 7 and 8 together, then patch 7 alone (anchored on it, so it owns 7). The rest drop."""

    @staticmethod
    def make():
        from vtc.methods import Method, Selection, Signal

        class KeepMergeAndGlobal(Method):
            name = "keep-merge-global"
            needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN, Signal.CLS_FEATURE})
            supports_auto = True

            def select_batch(self, signals, budget):
                n = signals.num_patches
                total = 8 if budget.is_auto else budget.tokens(n)
                out = []
                for b in range(signals.batch_size):
                    attn = signals.cls_attn[b].clone()
                    attn[[7, 8]] = -1.0  # the merged patches are never kept as they are
                    kept = attn.argsort(descending=True, stable=True)[: total - 3].sort().values
                    feats = signals.features[b]
                    merged = torch.stack([(feats[7] + feats[8]) / 2, feats[7]])
                    out.append(Selection.build(
                        feats, kept, merged_tokens=merged, merged_sources=[torch.tensor([7, 8]), torch.tensor([7])],
                        merged_anchors=[-1, 7], global_tokens=signals.cls_feature[b : b + 1],
                    ))
                return out

        return KeepMergeAndGlobal()


@pytest.mark.parametrize("budget", ["auto", 12])
def test_text_recovery_on_a_base_with_merged_and_global_tokens_keeps_them_as_they_were(budget):
    """X+text adds recovered patches among the base's dropped ones; the base's global token stays first, its
    merged tokens stay last with their values, sources and owners (the lone-source token anchored on 7 keeps
    owning it, though the token before it also lists 7)."""
    from vtc.methods import WithTextRecovery

    g = torch.Generator().manual_seed(11)
    s = Signals(torch.randn(2, N, D, generator=g), (8, 8), torch.rand(2, N, generator=g).softmax(-1),
                cls_feature=torch.randn(2, D, generator=g))
    s.text_sim = torch.zeros(2, N)
    s.text_sim[:, [40, 41, 50]] = 1.0  # three patches the question points at, far above the rest
    base = _KeepMergeAndGlobal.make()
    composed = WithTextRecovery(base).select(s, budget)
    for b, sel in enumerate(composed):
        before = base.select(s, budget if budget == "auto" else 12 - sel.info["recovered"])[b]
        k = sel.num_tokens
        assert sel.origin[0] == Origin.GLOBAL and torch.equal(sel.tokens[0], s.cls_feature[b])
        assert sel.origin[k - 2 :].tolist() == [Origin.MERGED, Origin.MERGED]
        assert torch.equal(sel.tokens[k - 2 :], before.tokens[-2:])
        assert [x.tolist() for x in sel.sources[k - 2 :]] == [[7, 8], [7]]
        assert sel.owner[8] == k - 2 and sel.owner[7] == k - 1  # as in the base: the anchor owns its patch
        recovered = [int(src[0]) for src, o in zip(sel.sources, sel.origin.tolist()) if o == Origin.RECOVERED]
        assert recovered and set(recovered) <= {40, 41, 50} and sel.info["recovered"] == len(recovered)
        assert all(before.owner[p] < 0 for p in recovered)  # recovered among what the base dropped
        singles = sel.kept_indices().tolist()
        assert singles == sorted(singles) and set(singles) == set(before.kept_indices().tolist()) | set(recovered)
        if budget != "auto":
            assert k == 12


@pytest.mark.parametrize("budget", [8, 10])
def test_text_recovery_never_recovers_a_patch_the_base_already_kept(budget):
    """The question points hardest at patch 0, which the base keeps as its first output token (owner 0):
    recovery must look only among dropped patches (owner < 0), so patch 0 appears once, as kept."""
    g = torch.Generator().manual_seed(12)
    attn = torch.rand(1, N, generator=g)
    attn[0, 0] = 5.0  # fastervlm keeps patch 0, first in raster order
    s = Signals(torch.randn(1, N, D, generator=g), (8, 8), attn.softmax(-1))
    s.text_sim = torch.zeros(1, N)
    s.text_sim[0, 0], s.text_sim[0, [40, 41]] = 3.0, 1.0
    [sel] = get("fastervlm+text").select(s, budget)
    kept = sel.kept_indices().tolist()
    assert len(kept) == len(set(kept)) and 0 in kept and sel.origin[kept.index(0)] == Origin.KEPT
    recovered = [p for p, o in zip(kept, sel.origin.tolist()) if o == Origin.RECOVERED]
    assert recovered and set(recovered) <= {40, 41}


def test_text_recovery_at_the_whole_budget_keeps_every_patch():
    s = signals(seed=3)
    s.text_sim = torch.rand(1, N, generator=torch.Generator().manual_seed(0))
    [sel] = get("fastervlm+text").select(s, N)
    assert sel.kept_indices().tolist() == list(range(N)) and sel.info["recovered"] == 0


def test_thinning_ordinals_equal_torch_linspace_rounded_for_every_count():
    """The batched ordinals against torch.linspace itself, one (available, wanted) pair per row, for every
    available up to 120 and every wanted up to it; padding past ``wanted`` is ``width``."""
    from vtc.methods.prumerge import thinning_ordinals

    pairs = torch.tensor([(a, w) for a in range(1, 121) for w in range(1, a + 1)])
    width = 121
    got = thinning_ordinals(pairs[:, 0], pairs[:, 1], width)
    for row, (a, w) in zip(got.tolist(), pairs.tolist()):
        expected = torch.linspace(0, a - 1, w).round().long().tolist()
        assert row == expected + [width] * (width - w), (a, w)


def test_first_in_order_takes_the_first_count_entries_of_the_mask_along_the_order():
    from vtc.methods.prumerge import first_in_order

    g = torch.Generator().manual_seed(4)
    mask = torch.rand(6, 15, generator=g) < 0.5
    order = torch.stack([torch.randperm(15, generator=g) for _ in range(6)])
    count = torch.tensor([0, 1, 3, 5, 15, 2])
    got = first_in_order(mask, order, count)
    for b in range(6):
        picked = [int(j) for j in order[b] if mask[b, j]][: int(count[b])]
        assert got[b].nonzero().squeeze(1).tolist() == sorted(picked)


@pytest.mark.parametrize("name", ["prumerge", "prumerge+"])
def test_the_neighbour_count_option_sets_how_many_patches_each_kept_token_absorbs(name):
    s = signals(seed=2, batch=2)
    for sel in get(name, neighbours=4).select(s, 10):
        k = sel.info["kept_before_merge"]
        assert [len(src) for src in sel.sources[:k]] == [1 + 4] * k
