"""Recoverable Compression against hand-built cases and naive re-computations of each step."""

import math

import numpy as np
import pytest
import torch

from vtc.methods import Budget, Origin, Signals, VTCError, get
from vtc.methods.lof import lof_outlier_counts
from vtc.methods.recoverable import MERGE_NEIGHBOURS, TEXT_WEIGHT, split_proportionally

N, D, GRID = 100, 12, (10, 10)


def make_signals(seed=0, batch=1, width=D):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, N, generator=g)
    logits[:, [3, 17, 42]] += 6.0  # three visually salient patches
    attn = logits.exp() / (1 + logits.exp().sum(-1, keepdim=True))  # softmax over 1+N, CLS column dropped
    text = 0.1 * torch.rand(batch, N, generator=g)
    text[:, [76, 77, 86, 87]] = torch.tensor([0.8, 0.9, 0.8, 0.8])  # the question points at a small object ...
    attn[:, [76, 77, 86, 87]] = attn.min()  # ... that is visually the least salient
    return Signals(
        features=torch.randn(batch, N, width, generator=g),
        grid=GRID,
        cls_attn=attn,
        keys=torch.randn(batch, N, width, generator=g),
        text_sim=text,
    )


def naive_lof_fraction(values, k=20):
    """Local Outlier Factor by its definition (Breunig et al. 2000), outliers at LOF > 1.5 (sklearn's 'auto').

    For each point: its k nearest other points, k-distance, reachability distances, local reachability
    density; LOF = mean density of the neighbours / own density. Plain loops, no scikit-learn.
    """
    x = [float(v) for v in values]
    n = len(x)
    k = min(k, n - 1)
    nbrs, kdist = [], []
    for i in range(n):
        order = sorted((abs(x[i] - x[j]), j) for j in range(n) if j != i)[:k]
        nbrs.append([j for _, j in order])
        kdist.append(order[-1][0])
    lrd = []
    for i in range(n):
        reach = [max(kdist[j], abs(x[i] - x[j])) for j in nbrs[i]]
        lrd.append(1.0 / (sum(reach) / k + 1e-10))
    lof = [sum(lrd[j] for j in nbrs[i]) / k / lrd[i] for i in range(n)]
    return sum(v > 1.5 for v in lof) / n


def test_low_salience_patch_named_by_text_is_recovered():
    signals = make_signals()
    [sel] = get("recoverable").select(signals, "auto")
    kept = sel.kept_indices().tolist()
    origin = dict(zip(kept, sel.origin[: len(kept)].tolist()))
    assert origin.get(77) == Origin.RECOVERED
    assert all(origin.get(i) == Origin.KEPT for i in (3, 17, 42))
    assert kept == sorted(kept)  # kept + recovered go back in raster order


def test_visual_only_variant_loses_that_patch():
    signals = make_signals()
    [sel] = get("recoverable", recover=False).select(signals, "auto")
    assert 77 not in sel.kept_indices().tolist()


def test_lof_sized_counts_match_sklearn():
    signals = make_signals(seed=3)
    attn, text = signals.cls_attn[0], signals.text_sim[0]
    [sel] = get("recoverable").select(signals, "auto")
    n_vis, n_txt, n_ctr = sel.info["auto_sizes"]

    r_v = naive_lof_fraction(attn.numpy())
    assert math.isclose(sel.info["r_v"], r_v)
    assert n_vis == max(1, int(N * r_v))
    visual = np.argsort(-attn.numpy())[:n_vis]

    masked = text.numpy().copy()
    masked[visual] = masked.min()
    r_t = naive_lof_fraction(masked)
    assert n_txt == int((N - n_vis) * r_t)

    left_mask = np.ones(N, bool)
    left_mask[visual] = False
    order = [i for i in np.argsort(-text.numpy()) if left_mask[i]][:n_txt]
    left_mask[order] = False
    r_c = naive_lof_fraction(attn.numpy()[left_mask])
    assert n_ctr == min(int(left_mask.sum() * r_c), left_mask.sum() - 1)
    counts = sel.counts()
    assert (counts["kept"], counts["recovered"]) == (n_vis, n_txt)
    assert counts["merged"] == n_ctr + 1


def naive_merge(signals, kept, centers, original=False, with_extra=True):
    """Step 5 by explicit loops over the published formula; ``centers`` in output order.

    ``original``: leftover-relative positions index the key array (for centres and candidates alike),
    unnormalised sums. Each centre takes its min(32, L - 1) nearest OTHER leftovers.
    """
    x, k, a, t = (signals.features[0], signals.keys[0], signals.cls_attn[0], signals.text_sim[0])
    leftovers = [i for i in range(N) if i not in set(kept)]
    key_of = {j: (k[pos] if original else k[j]) for pos, j in enumerate(leftovers)}
    tokens = []
    for c in centers:
        scored = []
        for j in leftovers:
            if j == c:
                continue
            kc, kj = key_of[c], key_of[j]
            cos = float(torch.dot(kc, kj) / (kc.norm() * kj.norm()))
            scored.append((cos + TEXT_WEIGHT * float(t[j]), j))
        nbrs = [j for _, j in sorted(scored, reverse=True)[: min(MERGE_NEIGHBOURS, len(leftovers) - 1)]]
        if original:
            tok = x[c].clone()
            for j in nbrs:
                tok += a[j] * x[j]
        else:
            members = [c] + nbrs
            tok = sum(a[m] * x[m] for m in members) / sum(a[m] for m in members)
        tokens.append(tok)
    rest = [j for j in leftovers if j not in set(centers)]
    if with_extra and rest:
        if original:
            tokens.append(sum(a[j] * x[j] for j in rest))
        else:
            tokens.append(sum(a[j] * x[j] for j in rest) / sum(a[j] for j in rest))
    return torch.stack(tokens)


@pytest.mark.parametrize("compat", ["intent", "original"])
@pytest.mark.parametrize("budget", [30, 60, 95, 97, 98, "auto"])
def test_merged_tokens_equal_naive_loop(compat, budget):
    signals = make_signals(seed=8, width=64)  # wide enough that the published int(width * r_c) gives centres
    [sel] = get("recoverable", compat=compat).select(signals, budget)
    kept = sel.kept_indices().tolist()
    leftovers = [i for i in range(N) if i not in set(kept)]
    if budget in (95, 97, 98):
        assert len(leftovers) <= MERGE_NEIGHBOURS  # fewer leftovers than a centre's neighbour count
    merged_rows = (sel.origin == Origin.MERGED).nonzero().squeeze(1)
    centers = sel.info["centres"]
    a = signals.cls_attn[0]
    by_attention = sorted(leftovers, key=lambda i: -float(a[i]))[: len(centers)]
    # centres are the top leftovers by CLS attention: raster order by default, attention order as published
    assert centers == (by_attention if compat == "original" else sorted(by_attention))
    expected = naive_merge(signals, kept, centers, original=compat == "original")
    torch.testing.assert_close(sel.tokens[merged_rows], expected, rtol=1e-5, atol=1e-6)


def test_some_merge_case_has_several_centres():
    """The merge test above must see several centres, or order and key indexing go unchecked."""
    signals = make_signals(seed=8, width=64)
    centres = {c: get("recoverable", compat=c).select(signals, 30)[0].info["centres"] for c in ("intent", "original")}
    assert min(len(c) for c in centres.values()) >= 2
    assert centres["original"] != sorted(centres["original"])  # attention order differs from raster order here


@pytest.mark.parametrize("budget", [1, 2, 3, 10, 37, 64, 99, 0.05, 0.5])
def test_fixed_budgets_are_exact_and_cover_every_patch(budget):
    signals = make_signals(seed=1, batch=2)
    for sel in get("recoverable").select(signals, budget):
        assert sel.num_tokens == Budget.parse(budget).tokens(N)
        if sel.num_tokens > 1:
            assert (sel.owner >= 0).all()  # every patch has exactly one owner ...
            assert set(torch.cat(sel.sources).tolist()) == set(range(N))  # ... and appears among the sources
        assert int(sel.owner.max()) < sel.num_tokens
        for token, src in enumerate(sel.sources):  # an owner always draws on the patch it owns
            owned = (sel.owner == token).nonzero().squeeze(1)
            assert set(owned.tolist()) <= set(src.tolist())


def test_full_budget_returns_every_patch():
    [sel] = get("recoverable").select(make_signals(), N)
    torch.testing.assert_close(sel.tokens, make_signals().features[0])


def test_fixed_budget_scales_stages_proportionally():
    signals = make_signals(seed=2)
    [auto] = get("recoverable").select(signals, "auto")
    n_vis, n_txt, n_ctr = auto.info["auto_sizes"]
    [fixed] = get("recoverable").select(signals, 41)
    expected = split_proportionally(40, [n_vis, n_txt, n_ctr])
    counts = fixed.counts()
    assert [counts["kept"], counts["recovered"], counts["merged"] - 1] == expected


def test_split_proportionally_largest_remainder():
    assert split_proportionally(10, [5, 3, 2]) == [5, 3, 2]
    assert split_proportionally(7, [1, 1, 1]) == [3, 2, 2]
    assert split_proportionally(5, [0, 4, 4]) == [1, 2, 2]  # the visual stage keeps at least one
    assert sum(split_proportionally(63, [9, 4, 7])) == 63


def test_original_compat_sizes_centers_with_hidden_width_and_ten_neighbours():
    signals = make_signals(seed=4)
    [orig] = get("recoverable", compat="original").select(signals, "auto")
    n_vis, n_txt, n_ctr = orig.info["auto_sizes"]
    kept = set(orig.kept_indices().tolist())
    leftover_attn = [float(signals.cls_attn[0, i]) for i in range(N) if i not in kept]
    r_c = naive_lof_fraction(leftover_attn, k=10)
    assert math.isclose(orig.info["r_c"], r_c)
    assert n_ctr == min(int(D * r_c), len(leftover_attn) - 1)
    assert orig.counts()["merged"] == n_ctr + (1 if n_ctr else 0)  # published: no centre, no extra token
    assert get("recoverable", compat="original").text_source == "prompt_first_line"


def test_original_drops_the_extra_token_only_without_centres_and_only_under_auto():
    flat = Signals(torch.randn(1, 40, 4), (5, 8), torch.full((1, 40), 1 / 41), torch.randn(1, 40, 4), torch.rand(1, 40))
    [auto] = get("recoverable", compat="original").select(flat, "auto")
    assert auto.info["auto_sizes"][2] == 0 and auto.counts()["merged"] == 0
    [fixed] = get("recoverable", compat="original").select(flat, 10)
    assert fixed.num_tokens == 10  # a fixed budget stays exact: its extra token is kept


def test_original_keeps_no_patch_when_nothing_stands_out():
    flat = Signals(torch.randn(1, 40, 4), (5, 8), torch.full((1, 40), 1 / 41), torch.randn(1, 40, 4), torch.zeros(1, 40))
    [orig] = get("recoverable", compat="original").select(flat, "auto")
    [intent] = get("recoverable").select(flat, "auto")
    assert orig.counts()["kept"] == 0  # int(N * 0), as published
    assert intent.counts()["kept"] == 1  # the default keeps at least one


def test_lof_counts_handle_tiny_and_flat_inputs():
    assert lof_outlier_counts(torch.tensor([[1.0, 2.0]]), 20).tolist() == [0]
    assert lof_outlier_counts(torch.ones(1, 50), 20).tolist() == [0]
    [sel] = get("recoverable").select(
        Signals(torch.randn(1, 16, 4), (4, 4), torch.full((1, 16), 1 / 17), torch.randn(1, 16, 4), torch.zeros(1, 16)),
        "auto",
    )
    assert sel.counts()["kept"] >= 1  # at least one patch even when nothing stands out


def test_bad_inputs_are_named():
    signals = make_signals()
    with pytest.raises(VTCError, match="compat"):
        get("recoverable", compat="paper")
    with pytest.raises(VTCError, match="text_sim"):
        get("recoverable").select(Signals(signals.features, GRID, signals.cls_attn, signals.keys), "auto")
    nan = make_signals()
    nan.cls_attn[0, 5] = float("nan")
    with pytest.raises(VTCError, match="NaN"):
        get("recoverable").select(nan, "auto")
    with pytest.raises(VTCError, match="more than"):
        get("recoverable").select(signals, N + 1)


def test_owner_map_follows_centres_then_first_claiming_centre_then_extra_token():
    """Ownership by hand: kept patches own themselves, each centre owns itself, a leftover belongs to the first
    centre (output order) that took it as a neighbour, and the rest to the extra token."""
    signals = make_signals(seed=8, width=64)
    for compat in ("intent", "original"):
        [sel] = get("recoverable", compat=compat).select(signals, 30)
        kept = sel.kept_indices().tolist()
        first_merged = len(kept)
        centres = sel.info["centres"]
        expected = {p: i for i, p in enumerate(kept)}
        expected.update({c: first_merged + j for j, c in enumerate(centres)})
        for j, c in enumerate(centres):
            for p in sel.sources[first_merged + j].tolist():
                expected.setdefault(p, first_merged + j)
        extra = first_merged + len(centres)
        for p in range(N):
            expected.setdefault(p, extra)
        assert sel.owner.tolist() == [expected[p] for p in range(N)]


def test_split_proportionally_gives_remainders_by_fraction_not_by_size():
    # raw shares 5.6, 0.7, 0.7: the two leftover slots go to the largest fractions (0.7, 0.7), not to the largest share
    assert split_proportionally(7, [8, 1, 1]) == [5, 1, 1]
    # the visual stage takes one slot from the largest other stage when its share rounds to zero
    assert split_proportionally(4, [1, 10, 10]) == [1, 1, 2]  # shares 0, 2, 2; the first largest gives one up


def test_visual_only_and_merge_free_variants_keep_fixed_budgets_exact():
    signals = make_signals(seed=2)
    bare = Signals(signals.features, GRID, signals.cls_attn, signals.keys)  # no text score at all
    for options in ({"recover": False}, {"merge": False}, {"recover": False, "merge": False}):
        for budget in (7, 30):
            [sel] = get("recoverable", **options).select(bare if not options.get("recover", True) else signals, budget)
            assert sel.num_tokens == budget, (options, budget)
    [auto] = get("recoverable", recover=False).select(bare, "auto")
    assert auto.info["auto_sizes"][1] == 0 and auto.info["r_t"] == 0.0
    [auto] = get("recoverable", merge=False).select(signals, "auto")
    assert auto.info["auto_sizes"][2] == 0 and auto.info["r_c"] == 0.0 and auto.counts()["merged"] == 0


def test_text_fraction_is_reported():
    signals = make_signals(seed=3)
    [sel] = get("recoverable").select(signals, "auto")
    n_vis = sel.info["auto_sizes"][0]
    masked = signals.text_sim[0].clone()
    masked[signals.cls_attn[0].topk(n_vis).indices] = masked.min()
    assert math.isclose(sel.info["r_t"], naive_lof_fraction(masked.tolist()))


def test_original_clamps_the_width_sized_centre_count_below_the_leftovers():
    signals = make_signals(seed=8, width=4096)  # int(4096 * r_c) exceeds the leftovers
    [sel] = get("recoverable", compat="original").select(signals, "auto")
    n_vis, n_txt, n_ctr = sel.info["auto_sizes"]
    assert int(4096 * sel.info["r_c"]) > N - n_vis - n_txt
    assert n_ctr == N - n_vis - n_txt - 1


def test_zero_attention_merges_as_a_plain_mean():
    signals = make_signals(seed=1)
    signals.cls_attn = torch.zeros_like(signals.cls_attn)
    [sel] = get("recoverable").select(signals, 10)
    extra_sources = sel.sources[-1]
    torch.testing.assert_close(sel.tokens[-1], signals.features[0, extra_sources].mean(0))


def test_top_mask_picks_among_the_allowed_entries_ties_to_the_lower_index():
    from vtc.methods.recoverable import top_mask

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])
    allowed = torch.tensor([[True, False, True, True], [True, True, True, True]])
    picked = top_mask(scores, allowed, torch.tensor([2, 2]))
    assert picked.tolist() == [[False, False, True, True], [True, True, False, False]]
    everything = top_mask(scores, allowed, torch.tensor([9, 0]))  # more than allowed: all allowed; 0: none
    assert everything.tolist() == [[True, False, True, True], [False] * 4]


def test_zero_attention_merges_take_plain_means_image_by_image_in_a_batch():
    """With no attention mass anywhere, every merge falls back to the plain mean of its members; in a batch
    each image's fallback counts its own members (a batch of 3 equals the three images alone)."""
    g = torch.Generator().manual_seed(21)
    b, n = 3, 48
    s = Signals(torch.randn(b, n, 6, generator=g), (6, 8), torch.zeros(b, n), torch.randn(b, n, 4, generator=g),
                torch.rand(b, n, generator=g))
    method = get("recoverable")
    together = method.select(s, 12)
    for i, sel in enumerate(together):
        [alone] = method.select(s.image(i), 12)
        torch.testing.assert_close(sel.tokens, alone.tokens, rtol=0, atol=1e-6)
        merged = (sel.origin == Origin.MERGED).nonzero().squeeze(1)
        for j in merged.tolist():
            src = sel.sources[j]
            torch.testing.assert_close(sel.tokens[j], s.features[i, src].mean(0), rtol=1e-5, atol=1e-6)
