"""Top-k building blocks (issue 21): the same picks as a full stable sort, without sorting whole rows."""

from __future__ import annotations

import pytest
import torch

from vtc.methods.primitives import mask_indices, top_in_raster_order, top_k_descending, top_k_mask


def rows(kind: str, seed: int, shape=(3, 4, 37)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "ties":  # few distinct values: ties straddle every cut
        x = torch.randint(0, 4, shape, generator=g).float()
    if kind == "masked":  # half the entries -inf, as a masked nearness row
        x = x.masked_fill(torch.rand(shape, generator=g) < 0.5, -float("inf"))
    return x


def sorted_reference(x: torch.Tensor) -> torch.Tensor:
    """Indices of a descending stable sort, by a Python sort of (-value, index) pairs per row."""
    flat = x.reshape(-1, x.shape[-1]).tolist()
    order = [sorted(range(len(r)), key=lambda i, r=r: (-r[i], i)) for r in flat]
    return torch.tensor(order).reshape(x.shape)


@pytest.mark.parametrize("kind", ["random", "ties", "masked"])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_descending_equals_the_stable_sort_prefix(kind, seed):
    x = rows(kind, seed)
    reference = sorted_reference(x)
    for k in range(x.shape[-1] + 1):
        assert torch.equal(top_k_descending(x, k), reference[..., :k]), k
        assert torch.equal(top_in_raster_order(x, k), reference[..., :k].sort(dim=-1).values), k


@pytest.mark.parametrize("kind", ["random", "ties", "masked"])
def test_top_k_mask_with_one_count_per_row(kind):
    x = rows(kind, 3)
    g = torch.Generator().manual_seed(4)
    counts = torch.randint(0, x.shape[-1] + 1, x.shape[:-1], generator=g)
    counts[0, 0], counts[0, 1] = 0, x.shape[-1]  # the extremes
    ranks = torch.empty_like(sorted_reference(x)).scatter_(-1, sorted_reference(x), torch.arange(x.shape[-1]).expand(x.shape))
    mask = top_k_mask(x, counts)
    assert torch.equal(mask, ranks < counts[..., None])
    assert torch.equal(mask.sum(-1), counts)


def test_mask_indices_hand_worked():
    mask = torch.tensor([[False, True, False, True, True], [True, True, False, False, True]])
    assert mask_indices(mask, 3).tolist() == [[1, 3, 4], [0, 1, 4]]
    # a hand-worked tie: values 2, 5, 5, 1, 5 -> the top 2 are the first two fives (index 1, 2)
    x = torch.tensor([[2.0, 5.0, 5.0, 1.0, 5.0]])
    assert top_k_descending(x, 2).tolist() == [[1, 2]]
    assert top_k_descending(x, 4).tolist() == [[1, 2, 4, 0]]
    # a tie just past the cut (the k-th and (k+1)-th values equal), and no tie at all (topk alone answers)
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0, 2.0]])
    assert top_k_descending(x, 2).tolist() == [[0, 2]]
    assert top_k_descending(x, 3).tolist() == [[0, 2, 4]]
    assert top_k_descending(torch.tensor([[0.5, 3.0, -1.0, 2.0]]), 3).tolist() == [[1, 3, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_sums_add_each_groups_rows_in_row_order(dtype):
    """group_sums equals a naive loop (to rounding) and index_add_ bit for bit (the same addition order); empty
    groups are zero rows."""
    from vtc.methods.primitives import group_sums

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 17, generator=g, dtype=dtype) * torch.logspace(-3, 3, 300, dtype=dtype)[:, None]
    group = torch.randint(0, 9, (300,), generator=g)
    group[group == 4] = 5  # group 4 stays empty
    got = group_sums(rows, group, 10)
    assert torch.equal(got, torch.zeros(10, 17, dtype=dtype).index_add_(0, group, rows))
    naive = torch.stack([sum((rows[i] for i in range(300) if group[i] == j), torch.zeros(17, dtype=dtype)) for j in range(10)])
    torch.testing.assert_close(got, naive)
    assert not got[4].any() and not got[9].any()
