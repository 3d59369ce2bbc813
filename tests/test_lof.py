"""vtc.methods.lof against scikit-learn's LocalOutlierFactor itself (and a naive numpy LOF for the tie rule)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from vtc.methods.base import VTCError
from vtc.methods.lof import local_outlier_factors, lof_outlier_counts, lof_outliers
from naive.recoverable import lof_outlier_fraction  # the per-image scikit-learn code LOF replaced

NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


@pytest.fixture(autouse=True, params=["cpu-kernel", "torch"])
def lof_backend(request, monkeypatch):
    """Every test here runs twice: float64 CPU scores through the compiled loop (lof_cpu), and through the
    torch form (an accelerator's path, and the CPU's without numba)."""
    import vtc.methods.lof as lof

    if request.param == "cpu-kernel":
        if lof.cpu_kernel() is None:
            pytest.skip("numba is not installed: no compiled CPU kernel")
    else:
        monkeypatch.setattr(lof, "USE_CPU_KERNEL", False)
    return request.param
FIXTURES = Path(__file__).parent / "fixtures" / "recoverable_original"


def sklearn_lof(row: np.ndarray, k: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(outlier mask, factors) of one row as vtc's reference computes them; rows under 3 entries: no outliers."""
    n = row.size
    if n < 3:
        return np.zeros(n, bool), None
    lof = LocalOutlierFactor(n_neighbors=min(k, n - 1), contamination="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the duplicate warning of tie-heavy rows
        labels = lof.fit_predict(row.astype(NUMPY[dtype]).reshape(-1, 1))
    return labels == -1, -lof.negative_outlier_factor_


def assert_rows_equal_sklearn(rows: list[np.ndarray], k: int, dtype: torch.dtype, factors: bool = True) -> None:
    """Each row alone and all rows padded into one batch give scikit-learn's labels (and factors, bit for bit)."""
    n = max(len(r) for r in rows)
    scores = torch.full((len(rows), n), float("nan"), dtype=torch.float64)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for b, row in enumerate(rows):
        scores[b, : len(row)] = torch.from_numpy(row)
        valid[b, : len(row)] = True
    batched = lof_outliers(scores, k, valid, dtype)
    batched_factors = local_outlier_factors(scores, k, valid, dtype)
    for b, row in enumerate(rows):
        expected, expected_factors = sklearn_lof(row, k, dtype)
        alone = lof_outliers(torch.from_numpy(row)[None], k, dtype=dtype)[0].numpy()
        np.testing.assert_array_equal(alone, expected, err_msg=f"row {b} (n={len(row)}, k={k}, {dtype})")
        np.testing.assert_array_equal(batched[b, : len(row)].numpy(), expected, err_msg=f"row {b} batched")
        assert not batched[b, len(row):].any()
        if factors and expected_factors is not None:
            np.testing.assert_array_equal(batched_factors[b, : len(row)].numpy(), expected_factors, err_msg=f"row {b}")
            alone_factors = local_outlier_factors(torch.from_numpy(row)[None], k, dtype=dtype)[0].numpy()
            np.testing.assert_array_equal(alone_factors, expected_factors, err_msg=f"row {b} alone")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [10, 20])
def test_random_rows_of_many_sizes_equal_sklearn_bit_for_bit(k, dtype):
    rng = np.random.default_rng(k)
    sizes = [1, 2, 3, 4, 5, 9, 2 * k, 2 * k + 1, 2 * k + 2, 2 * k + 3, 64, 100, 257, 576, 700]  # brute / KD-tree edge
    sizes += [int(s) for s in rng.integers(3, 701, size=12)]
    rows = [rng.normal(size=s) * rng.uniform(1e-3, 10) + rng.uniform(-5, 5) for s in sizes]
    rows += [rng.dirichlet(np.ones(576) * 0.3) for _ in range(3)]  # attention-like: softmax scores
    assert_rows_equal_sklearn(rows, k, dtype)


@pytest.mark.parametrize("k", [3, 8, 16, 35])
def test_other_neighbour_counts_follow_numpys_summation(k):
    """k below 8, multiples of 8 and several blocks: numpy's pairwise sum structure changes with k."""
    rng = np.random.default_rng(k)
    rows = [rng.normal(size=s) for s in (k + 1, 2 * k + 2, 150, 400)]
    assert_rows_equal_sklearn(rows, k, torch.float32)
    assert_rows_equal_sklearn(rows, k, torch.float64)


def masked_text_row(rng: np.random.Generator, n: int) -> np.ndarray:
    """Recoverable Compression's masked text scores: a random 5-30% of the row set to the row minimum."""
    row = rng.random(n) * 0.3
    row[rng.random(n) < rng.uniform(0.05, 0.3)] = row.min()
    return row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_text_scores_with_many_duplicates_equal_sklearn(dtype):
    rng = np.random.default_rng(1)
    rows = [masked_text_row(rng, int(n)) for n in rng.integers(3, 700, size=40)]
    assert_rows_equal_sklearn(rows, 20, dtype)
    assert_rows_equal_sklearn(rows[:15], 10, dtype)


def test_constant_rows_and_rows_of_two_values_equal_sklearn():
    rows = [np.full(n, 0.25) for n in (3, 5, 22, 50, 300)]
    rows += [np.r_[np.zeros(n), np.ones(m)] for n, m in ((2, 30), (25, 25), (40, 3), (1, 100))]
    assert_rows_equal_sklearn(rows, 20, torch.float64)
    assert_rows_equal_sklearn(rows, 10, torch.float32)


def test_rows_under_three_entries_have_no_outliers_and_counts_sum_the_mask():
    scores = torch.tensor([[0.0, 5.0, 9.0, 100.0], [1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 2.0, 50.0]])
    valid = torch.tensor([[True, True, False, False], [True, False, False, False], [False] * 4])
    assert lof_outlier_counts(scores, 20, valid).tolist() == [0, 0, 0]
    assert lof_outlier_counts(scores[:, :2], 20).tolist() == [0, 0, 0]
    rng = np.random.default_rng(4)
    scores = torch.from_numpy(np.r_[rng.normal(size=(6, 80)), [np.r_[np.zeros(79), 50.0]]])
    expected = [int(sklearn_lof(row, 20, torch.float64)[0].sum()) for row in scores.numpy()]
    assert lof_outlier_counts(scores, 20).tolist() == expected
    assert expected[-1] == 1  # the row with one far entry


def test_count_over_length_is_recoverable_reference_fraction():
    rng = np.random.default_rng(5)
    for n in (3, 30, 200, 576):
        row = torch.from_numpy(masked_text_row(rng, n)).float()
        for dtype in (torch.float32, torch.float64):
            count = lof_outlier_counts(row[None], 20, dtype=dtype)[0]
            assert count.item() / n == lof_outlier_fraction(row, 20, dtype)


def test_padding_never_changes_a_row():
    """The same rows in batches of different widths, with garbage (NaN, huge) in the padding."""
    rng = np.random.default_rng(6)
    rows = [rng.normal(size=n) for n in (3, 12, 41, 42, 100, 300)] + [masked_text_row(rng, 90)]
    alone = [lof_outliers(torch.from_numpy(r)[None], 20)[0] for r in rows]
    for width, fill in ((300, float("nan")), (400, 1e30), (350, -7.0)):
        scores = torch.full((len(rows), width), fill, dtype=torch.float64)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, row in enumerate(rows):
            place = torch.from_numpy(rng.permutation(width)[: len(row)])  # valid entries scattered, not a prefix
            scores[b, place] = torch.from_numpy(row)
            valid[b, place] = True
        mask = lof_outliers(scores, 20, valid)
        for b, row in enumerate(rows):
            assert not mask[b][~valid[b]].any()
            label = dict(zip(scores[b][valid[b]].tolist(), mask[b][valid[b]].tolist()))  # equal scores: equal labels
            assert [label[v] for v in row.tolist()] == alone[b].tolist(), (b, width)


def test_batch_equals_one_row_at_a_time():
    rng = np.random.default_rng(7)
    scores = torch.from_numpy(np.stack([masked_text_row(rng, 256) for _ in range(8)] + [rng.normal(size=256)]))
    for dtype in (torch.float32, torch.float64):
        batched = lof_outliers(scores, 20, dtype=dtype)
        single = torch.stack([lof_outliers(row[None], 20, dtype=dtype)[0] for row in scores])
        assert torch.equal(batched, single)
        assert batched.any()


def naive_lof(row: np.ndarray, k: int, dtype: torch.dtype) -> np.ndarray:
    """scikit-learn's formulas with the documented tie rule (equidistant: lower score first), point by point."""
    x = row.astype(NUMPY[dtype]).astype(np.float64)
    n = x.size
    k = min(k, n - 1)
    brute = k >= n // 2
    dist, neighbours = [], []
    for i in range(n):
        others = np.delete(np.arange(n), i)
        if brute:
            squared = np.maximum((x[i] * x[i] + -2.0 * (x[i] * x[others])) + x[others] * x[others], 0.0)
        else:
            squared = (x[i] - x[others]) ** 2
        nearest = others[np.lexsort((x[others], squared))[:k]]
        neighbours.append(nearest)
        chosen = squared[np.searchsorted(others, nearest)]  # brute force roots float32 input in float32
        dist.append(np.sqrt(chosen.astype(NUMPY[dtype])) if brute else np.sqrt(chosen).astype(NUMPY[dtype]))
    dist, neighbours = np.array(dist), np.array(neighbours)
    reach = np.maximum(dist, dist[neighbours, k - 1])
    lrd = 1.0 / (np.mean(reach, axis=1) + 1e-10)
    return np.mean(lrd[neighbours] / lrd[:, None], axis=1)


def quantised_row(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    row = rng.normal(size=n) * rng.uniform(0.01, 3)
    if kind == "fp16":
        return (row * 0.05 + 0.2).astype(np.float16).astype(np.float64)
    return np.round(row * rng.choice([2, 5, 20])) / 8


@pytest.mark.parametrize("kind", ["fp16", "grid"])
def test_equidistant_neighbours_follow_the_documented_rule(kind):
    """On rows full of equidistant neighbours the factors are a naive LOF's with 'lower score first'."""
    rng = np.random.default_rng(8)
    rows = [quantised_row(rng, int(n), kind) for n in rng.integers(3, 160, size=12)]
    for dtype in (torch.float32, torch.float64):
        for k in (10, 20):
            for row in rows:
                got = local_outlier_factors(torch.from_numpy(row)[None], k, dtype=dtype)[0].numpy()
                np.testing.assert_array_equal(got, naive_lof(row, k, dtype))


def has_ambiguous_tie(row: np.ndarray, k: int) -> bool:
    """Whether some entry's k-th distance is shared by entries on both sides and not all of them fit."""
    n = row.size
    k = min(k, n - 1)
    for i in range(n):
        d = np.abs(np.delete(row, i) - row[i])
        kth = np.sort(d)[k - 1]
        if kth == 0:
            continue
        tied = np.delete(row, i)[d == kth]
        if (d <= kth).sum() > k and (tied < row[i]).any() and (tied > row[i]).any():
            return True
    return False


@pytest.mark.parametrize("kind", ["fp16", "grid"])
def test_quantised_rows_differ_from_sklearn_only_through_two_sided_ties(kind):
    rng = np.random.default_rng(9)
    differing = 0
    for _ in range(60):
        row = quantised_row(rng, int(rng.integers(3, 500)), kind)
        expected, _ = sklearn_lof(row, 20, torch.float64)
        got = lof_outliers(torch.from_numpy(row)[None], 20)[0].numpy()
        if (got != expected).any():
            differing += 1
            assert has_ambiguous_tie(row, 20)
    assert differing < 30  # measured: see the module docstring


def test_recoverable_fixture_text_scores_equal_sklearn():
    """The published code's text scores (8 images, 256 patches), raw and masked as step 4 masks them."""
    cases = torch.load(FIXTURES / "cases.pt")["cases"]
    rng = np.random.default_rng(10)
    rows = []
    for case in cases:
        row = case["text_sim"].double().numpy()
        masked = row.copy()
        masked[rng.permutation(row.size)[: rng.integers(10, 80)]] = row.min()
        rows += [row, masked]
    for dtype in (torch.float32, torch.float64):
        for k in (10, 20):
            assert_rows_equal_sklearn(rows, k, dtype, factors=False)  # labels exactly; the factors:
            scores = torch.from_numpy(np.stack(rows))
            expected = np.stack([sklearn_lof(row, k, dtype)[1] for row in rows])
            # these scores have equidistant neighbours, which scikit-learn sums in an arbitrary order
            np.testing.assert_allclose(local_outlier_factors(scores, k, dtype=dtype).numpy(), expected,
                                       rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lof_outliers(torch.rand(5), 20), "floating \\(batch, n\\)"),
        (lambda: lof_outliers(torch.ones(2, 5, dtype=torch.long), 20), "floating"),
        (lambda: lof_outliers([[1.0, 2.0]], 20), "floating"),
        (lambda: lof_outliers(torch.rand(2, 5), 0), "n_neighbors"),
        (lambda: lof_outliers(torch.rand(2, 5), True), "n_neighbors"),
        (lambda: lof_outliers(torch.rand(2, 5), 2.0), "n_neighbors"),
        (lambda: lof_outliers(torch.rand(2, 5), 3, dtype=torch.float16), "dtype"),
        (lambda: lof_outliers(torch.rand(2, 5), 3, torch.ones(2, 4, dtype=torch.bool)), "valid"),
        (lambda: lof_outliers(torch.rand(2, 5), 3, torch.ones(2, 5)), "valid"),
        (lambda: lof_outliers(torch.tensor([[1.0, float("nan"), 2.0]]), 3), "finite"),
        (lambda: lof_outlier_counts(torch.tensor([[1.0, float("inf"), 2.0]]), 3), "finite"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(VTCError, match=match):
        call()


@pytest.mark.parametrize("kind", ["random", "quantised", "softmax"])
def test_window_and_merge_loop_find_the_same_neighbours(kind):
    """The two computations of the KD-tree rows' neighbours (chosen by batch size and device) agree exactly,
    also on tie-heavy rows and with +inf (invalid) entries at the end of a row."""
    from vtc.methods.lof import _neighbours, _padded, _window_neighbours

    g = torch.Generator().manual_seed({"random": 0, "quantised": 1, "softmax": 2}[kind])
    scores = torch.randn(6, 97, generator=g, dtype=torch.float64)
    if kind == "quantised":
        scores = (scores * 3).round() / 3
    if kind == "softmax":
        scores = scores.softmax(-1)
    scores[0, 60:] = torch.inf  # a row with invalid entries, sorted last
    ordered = scores.sort(dim=-1).values
    for width in (1, 5, 20, 48):
        padded = _padded(ordered, width, torch.inf)
        window, loop = _window_neighbours(padded, ordered, width), _neighbours(padded, ordered, width, None)
        valid = ordered.isfinite()
        assert torch.equal(window[:, valid], loop[:, valid]), width


@pytest.mark.parametrize("k", [10, 20])
def test_brute_force_rows_beside_long_rows_keep_scikit_learns_rounded_distances(k):
    """A masked batch mixes brute-force rows (at most 2k + 1 entries) with KD-tree rows. Far from zero, the
    brute-force distance (a root of the GEMM expansion) differs from |x - y| in its last bits for every
    entry, so each brute row's entries, up to the (2k + 1)-th, must take the brute-force path."""
    rng = np.random.default_rng(7 + k)
    rows = [1000.0 + rng.normal(size=s) * 1e-2 for s in (2 * k + 1, 2 * k, k + 1, 2 * k + 1)]
    rows += [rng.normal(size=300), rng.normal(size=3 * k)]
    assert_rows_equal_sklearn(rows, k, torch.float64)


@pytest.mark.parametrize("sizes", [(300, 250, 576), (30, 35, 41), (30, 300, 41), (8, 8, 8), (8, 300, 2)])
def test_uniform_batches_take_the_shortcut_with_the_per_row_result(sizes, monkeypatch):
    """On the CPU a masked batch whose rows share k (and the algorithm) is computed as one k, one algorithm;
    the per-row computation (the accelerator's path) gives the same factors bit for bit: all KD-tree rows, all
    brute-force rows, one k with both algorithms, a k under n_neighbors, and rows that differ in k."""
    import vtc.methods.lof as lof

    rng = np.random.default_rng(sum(sizes))
    width = max(sizes)
    scores = torch.from_numpy(rng.normal(size=(len(sizes), width)))
    valid = torch.zeros(len(sizes), width, dtype=torch.bool)
    for b, size in enumerate(sizes):
        valid[b, torch.from_numpy(rng.permutation(width)[:size])] = True
    for dtype in (torch.float32, torch.float64):
        shortcut = local_outlier_factors(scores, 20, valid, dtype)
        monkeypatch.setattr(lof, "_uniform", lambda k, brute: (k, brute))
        per_row = local_outlier_factors(scores, 20, valid, dtype)
        monkeypatch.undo()
        torch.testing.assert_close(shortcut, per_row, rtol=0, atol=0, equal_nan=True)
        for b, size in enumerate(sizes):  # and both are scikit-learn's
            if size >= 3:
                _, expected = sklearn_lof(scores[b][valid[b]].numpy(), 20, dtype)
                np.testing.assert_array_equal(shortcut[b][valid[b]].numpy(), expected)

