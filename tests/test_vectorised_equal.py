"""Issue 21: the batched methods give exactly what their per-image code gave (frozen in tests/naive/).

Every Selection field is compared: tokens (allclose 1e-5), origin, owner, sources and info (exactly),
for several budgets, seeds, batch sizes 1 and 5, on random signals and on tie-heavy ones
(attention quantised to a few repeated values, duplicated feature / key / projected rows).
"""

from __future__ import annotations

import pytest
import torch
from naive.divprune import DivPrune as NaiveDivPrune
from naive.pool import SpatialPool as NaivePool
from naive.prumerge import PruMerge as NaivePruMerge
from naive.prumerge import PruMergePlus as NaivePruMergePlus
from naive.todre import ToDRE as NaiveToDRE
from naive.tome import ToMe as NaiveToMe

from vtc.methods import Signals, get

GRID = (9, 10)  # N = 90: room for a budget of 64, small enough for the naive loops
N = GRID[0] * GRID[1]

CASES = [
    ("divprune", {}, NaiveDivPrune),
    ("divprune", {"space": "features"}, NaiveDivPrune),
    ("todre", {}, NaiveToDRE),
    ("todre", {"objective": "maxsum"}, NaiveToDRE),
    ("prumerge", {}, NaivePruMerge),
    ("prumerge", {"order": "raster"}, NaivePruMerge),
    ("prumerge+", {}, NaivePruMergePlus),
    ("prumerge+", {"order": "raster"}, NaivePruMergePlus),
    ("tome", {}, NaiveToMe),
    ("tome", {"metric": "features"}, NaiveToMe),
    ("pool", {}, NaivePool),
]


def random_signals(batch: int, seed: int, ties: bool, grid=GRID) -> Signals:
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    feats = torch.randn(batch, n, 12, generator=g)
    keys = torch.randn(batch, n, 8, generator=g)
    projected = torch.randn(batch, n, 16, generator=g)
    attn = torch.randn(batch, n, generator=g).mul(2).softmax(-1)
    if ties:
        # a few attention levels (many exact ties, a flat majority for the IQR rule), duplicated rows
        levels = torch.tensor([0.001, 0.002, 0.004, 0.05])
        level = torch.randint(0, 4, (batch, n), generator=g)
        attn = levels[level.clamp(min=torch.randint(0, 2, (batch, n), generator=g))]
        attn[:, : n // 2] = 0.002  # most values repeated
        attn[0, 3] = attn[0, 40] = 0.05  # a tie at the top
        if batch > 2:  # flat images next to busy ones: the IQR keeps 1 and 3 patches, the batch pads to the longest
            attn[1:3] = 0.002
            attn[1, 7] = 0.05
            attn[2, [8, 30, 31]] = 0.05
        for t in (feats, keys, projected):
            src = torch.randint(0, n, (n // 3,), generator=g)
            dst = torch.randint(0, n, (n // 3,), generator=g)
            t[:, dst] = t[:, src]
            t[:, 5] = t[:, 6]  # neighbours identical
    return Signals(features=feats, grid=grid, cls_attn=attn, keys=keys, projected=projected)


def assert_same(new, old, where: str) -> None:
    assert len(new) == len(old), where
    for b, (s, t) in enumerate(zip(new, old)):
        at = f"{where}, image {b}"
        assert s.tokens.shape == t.tokens.shape, at
        torch.testing.assert_close(s.tokens, t.tokens, rtol=1e-5, atol=1e-5, msg=at)
        assert s.origin.tolist() == t.origin.tolist(), at
        assert s.owner.tolist() == t.owner.tolist(), at
        assert [x.tolist() for x in s.sources] == [x.tolist() for x in t.sources], at
        assert s.info == t.info, at


@pytest.mark.parametrize("name,options,naive", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_batched_method_equals_its_naive_reference(name, options, naive):
    method, reference = get(name, **options), naive(**options)
    budgets = [1, 2, 3, 7, 64, 0.25, N] + (["auto"] if method.supports_auto else [])
    for ties in (False, True):
        for batch, seed in ((1, 0), (5, 1), (5, 2)):
            signals = random_signals(batch, seed, ties)
            for budget in budgets:
                where = f"{name}{options} budget {budget} batch {batch} seed {seed} ties {ties}"
                assert_same(method.select(signals, budget), reference.select(signals, budget), where)


@pytest.mark.parametrize("grid", [(24, 24), (5, 7)])
def test_pool_equals_naive_on_other_grids(grid):
    signals = random_signals(3, 4, False, grid)
    n = grid[0] * grid[1]
    for budget in (1, 3, 13, 33, 64, n - 1, n):
        if budget <= n:
            got, want = get("pool").select(signals, budget), NaivePool().select(signals, budget)
            assert_same(got, want, f"pool {grid} {budget}")


def test_real_shape_batch_equals_naive_for_the_fast_methods():
    # 576 tokens as LLaVA-1.5 gives them: the IQR budget and the ToMe rounds at their real sizes
    signals = random_signals(2, 7, False, (24, 24))
    for name, options, naive in CASES:
        if name.startswith(("prumerge", "tome", "pool")):
            for budget in (64, "auto") if name.startswith("prumerge") else (64, 100):
                got, want = get(name, **options).select(signals, budget), naive(**options).select(signals, budget)
                assert_same(got, want, f"{name}{options} {budget} at 576 tokens")


def test_most_isolated_batched_leaves_the_distances_as_they_were():
    from vtc.methods.divprune import most_isolated
    from vtc.methods.primitives import cosine_distance_matrix

    x = random_signals(3, 5, True).features
    distance = cosine_distance_matrix(x)
    before = distance.clone()
    picks = most_isolated(distance)
    assert torch.equal(distance, before)
    # by hand: for each image, the token whose nearest other token is farthest
    for b in range(3):
        nearest = [min(float(distance[b, i, j]) for i in range(N) if i != j) for j in range(N)]
        assert int(picks[b]) == max(range(N), key=lambda j: (nearest[j], -j))


MERGING = [c for c in CASES if c[0] in ("prumerge", "prumerge+", "tome", "pool") and not c[1]]


@pytest.mark.parametrize("name,options,naive", MERGING)
def test_half_precision_features_merge_like_the_naive_code(name, options, naive):
    signals = random_signals(3, 8, False)
    signals.features = signals.features.half()
    for budget in (7, 64) + (("auto",) if name.startswith("prumerge") else ()):
        got, want = get(name, **options).select(signals, budget), naive(**options).select(signals, budget)
        for s, t in zip(got, want):
            assert s.tokens.dtype == t.tokens.dtype == torch.float16
            torch.testing.assert_close(s.tokens, t.tokens, rtol=2e-3, atol=2e-3)
            assert [x.tolist() for x in s.sources] == [x.tolist() for x in t.sources]
