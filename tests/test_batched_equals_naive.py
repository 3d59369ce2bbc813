"""Batched selection (issue 21) equals the per-image code it replaced, kept frozen in tests/naive/.

Random and tie-heavy signals, batches of 1 and 5, budgets from 1 to N: every field of every
Selection (tokens to float tolerance; origin, sources, owner and info exactly) must match.
"""

import pytest
import torch

from naive import evit as naive_evit
from naive import fastervlm as naive_fastervlm
from naive import fopru as naive_fopru
from naive import random_none as naive_random_none
from naive import recoverable as naive_recoverable
from naive import visionzip as naive_visionzip
from vtc.methods import Signals, get

GRID = (6, 8)
N = GRID[0] * GRID[1]


def signals(batch: int, seed: int, ties: bool) -> Signals:
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(batch, N, generator=g).softmax(-1)
    received = torch.rand(batch, N, generator=g)
    keys = torch.randn(batch, N, 8, generator=g)
    text = torch.rand(batch, N, generator=g) * 0.3
    if ties:  # repeated scores and duplicate key rows: tie-breaking must match too
        attn = (attn * 50).round() / 50
        received = (received * 4).round() / 4
        keys[:, 1::3] = keys[:, 0:1]
        text = (text * 20).round() / 20
    return Signals(
        features=torch.randn(batch, N, 16, generator=g), grid=GRID, cls_attn=attn, keys=keys,
        received_attn=received, text_sim=text, cls_feature=torch.randn(batch, 16, generator=g), index=3,
    )


@pytest.fixture
def reference_lof(monkeypatch):
    """Tie-heavy rows: scikit-learn breaks equidistant-neighbour ties by its KD-tree's visiting order, which
    vtc's torch LOF does not reproduce (methods/lof.py, tested in tests/test_lof.py). To compare the batching
    alone, the per-image reference then runs vtc's LOF row by row; on tie-free rows it keeps scikit-learn."""
    from vtc.methods.lof import lof_outlier_counts

    def use(ties: bool):
        if ties:
            def torch_fraction(scores, n_neighbors=20, dtype=torch.float64):
                return int(lof_outlier_counts(scores.reshape(1, -1), n_neighbors, dtype=dtype)) / scores.numel()

            monkeypatch.setattr(naive_recoverable, "lof_outlier_fraction", torch_fraction)

    return use


def assert_same(new, old):
    assert len(new) == len(old)
    for a, b in zip(new, old):
        torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-5, atol=1e-5)
        assert a.origin.tolist() == b.origin.tolist()
        assert [s.tolist() for s in a.sources] == [s.tolist() for s in b.sources]
        assert a.owner.tolist() == b.owner.tolist()
        assert a.info == b.info


CASES = [
    ("fastervlm", {}, naive_fastervlm.FasterVLM),
    ("fopru-rank", {}, naive_fopru.FoPruRank),
    ("fopru-row", {}, naive_fopru.FoPruRow),
    ("evit", {}, naive_evit.EViT),
    ("evit", {"order": "score"}, naive_evit.EViT),
    ("visionzip", {}, naive_visionzip.VisionZip),
    ("visionzip", {"keep_cls": False, "contextual": "mean"}, naive_visionzip.VisionZip),
    ("visionzip", {"dominant_share": 0.5}, naive_visionzip.VisionZip),
    ("random", {"seed": 4}, naive_random_none.RandomKeep),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name,options,naive", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_batched_method_equals_its_per_image_reference(name, options, naive, batch, ties):
    new, old = get(name, **options), naive(**options)
    for seed, budget in enumerate([1, 2, 3, 7, 8, 11, 0.25, N - 1, N]):
        s = signals(batch, seed, ties)
        assert_same(new.select(s, budget), old.select(s, budget))


def test_none_keeps_every_patch_as_before():
    s = signals(3, 0, False)
    assert_same(get("none").select(s, "auto"), naive_random_none.NoCompression().select(s, "auto"))


RECOVERABLE = [
    {},
    {"compat": "original"},
    {"recover": False},
    {"merge": False},
    {"recover": False, "merge": False},
    {"centre_order": "attention", "centre_neighbours": 10},
    {"text_scale": "published"},
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("options", RECOVERABLE, ids=str)
def test_batched_recoverable_equals_its_per_image_reference(options, batch, ties, reference_lof):
    reference_lof(ties)
    new, old = get("recoverable", **options), naive_recoverable.RecoverableCompression(**options)
    for seed, budget in enumerate(["auto", 1, 2, 3, 7, 12, 0.25, N - 1, N]):
        s = signals(batch, seed, ties)
        assert_same(new.select(s, budget), old.select(s, budget))


@pytest.mark.parametrize("base,naive_base", [("fastervlm", naive_fastervlm.FasterVLM), ("fopru-rank", naive_fopru.FoPruRank), ("fopru-row", naive_fopru.FoPruRow), ("random", naive_random_none.RandomKeep)])
@pytest.mark.parametrize("batch", [1, 5])
def test_batched_text_recovery_equals_its_per_image_reference(base, naive_base, batch, reference_lof):
    reference_lof(True)  # odd seeds below are tie-heavy
    new, old = get(f"{base}+text"), naive_recoverable.WithTextRecovery(naive_base())
    for seed, budget in enumerate([2, 3, 7, 12, 0.25, N - 1]):
        s = signals(batch, seed, ties=seed % 2 == 1)
        assert_same(new.select(s, budget), old.select(s, budget))


@pytest.mark.parametrize("batch", [1, 5])
def test_batched_text_recovery_under_auto_equals_its_per_image_reference(batch, reference_lof):
    reference_lof(True)  # odd seeds below are tie-heavy
    base = naive_recoverable.RecoverableCompression(merge=False)  # a base with an 'auto' rule
    new, old = get("recoverable", merge=False), naive_recoverable.WithTextRecovery(base)
    from vtc.methods.recoverable import WithTextRecovery

    new = WithTextRecovery(new)
    for seed in range(4):
        s = signals(batch, seed, ties=seed % 2 == 1)
        assert_same(new.select(s, "auto"), old.select(s, "auto"))


@pytest.mark.parametrize("ties", [False, True])
def test_keep_masks_are_the_methods_own_choice_at_each_count(ties):
    """``Method.keep_masks`` (what ``X+text`` re-selects with) equals each method's own Selection at every
    image's count, for every registered method that implements it."""
    from vtc.methods import Budget, Method, available

    s = signals(5, 11, ties)
    counts = torch.tensor([1, 7, 20, N - 1, N])
    vision_side = [name for name in available() if isinstance(get(name), Method)]
    ranked = [name for name in vision_side if get(name).keep_masks(s, counts) is not None]
    assert {"fastervlm", "fopru-rank"} <= set(ranked)
    for name in ranked:
        method = get(name)
        masks = method.keep_masks(s, counts)
        for b, count in enumerate(counts.tolist()):
            (own,) = method.select(s.image(b), Budget("count", count))
            assert masks[b].tolist() == (own.owner >= 0).tolist(), (name, count)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("options", [{}, {"compat": "original"}], ids=str)
def test_recoverable_merge_ranks_only_reachable_leftovers_and_picks_the_same(options, ties, reference_lof):
    """On a LLaVA-sized grid with spread text scores the merge ranks only the leftovers whose text term can
    reach a centre's 32 nearest (``reachable_candidates``), and still picks what ranking every leftover picks."""
    from vtc.methods.recoverable import TEXT_WEIGHT, reachable_candidates

    reference_lof(ties)
    grid, batch = (24, 24), 3
    g = torch.Generator().manual_seed(11)
    n = grid[0] * grid[1]
    text = torch.rand(batch, n, generator=g) * 0.3
    keys = torch.randn(batch, n, 16, generator=g)
    if ties:
        text = (text * 20).round() / 20
        keys[:, 1::3] = keys[:, 0:1]
    s = Signals(features=torch.randn(batch, n, 8, generator=g), grid=grid, keys=keys, text_sim=text,
                cls_attn=torch.randn(batch, n, generator=g).mul(2).softmax(-1))
    leftovers = torch.rand(batch, n, generator=g) < 0.9
    candidates, usable = reachable_candidates(TEXT_WEIGHT * text, leftovers, 32)
    assert usable.sum(-1).max() < leftovers.sum(-1).min() / 2  # the filter does cut the columns here
    assert torch.equal(torch.zeros_like(leftovers).scatter_(1, candidates, usable) & ~leftovers, torch.zeros_like(leftovers))
    new, old = get("recoverable", **options), naive_recoverable.RecoverableCompression(**options)
    for budget in ["auto", 64, 0.1]:
        assert_same(new.select(s, budget), old.select(s, budget))
