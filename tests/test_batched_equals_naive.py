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
from naive import visionzip as naive_visionzip
from vtc.methods import Signals, get

GRID = (6, 8)
N = GRID[0] * GRID[1]


def signals(batch: int, seed: int, ties: bool) -> Signals:
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(batch, N, generator=g).softmax(-1)
    received = torch.rand(batch, N, generator=g)
    keys = torch.randn(batch, N, 8, generator=g)
    if ties:  # repeated scores and duplicate key rows: tie-breaking must match too
        attn = (attn * 50).round() / 50
        received = (received * 4).round() / 4
        keys[:, 1::3] = keys[:, 0:1]
    return Signals(
        features=torch.randn(batch, N, 16, generator=g), grid=GRID, cls_attn=attn, keys=keys,
        received_attn=received, cls_feature=torch.randn(batch, 16, generator=g), index=3,
    )


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
