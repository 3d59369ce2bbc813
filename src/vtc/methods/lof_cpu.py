"""The CPU kernel of ``lof.py``: the same LOF factors, one compiled loop per row instead of ~100 tensor operations.

On the CPU the torch form of ``lof._factors`` is bound by its operation count and memory passes (about 0.3-0.5 ms
per 576-score row at batch 16, 0.8-1.7 ms per call at batch 1, on one thread); this loop does the same arithmetic,
in the same order, row by row: about 0.1 ms per row (the sort stays torch's), half of it the merge's chain of
dependent steps (compare, step a side, load, square), half the two passes of means (with k divisions per entry,
which scikit-learn's rounding needs). Running the entries' steps interleaved or without branches measured no
faster; guards instead of bounds tests, with unsigned indices, halved the merge. It needs numba (``pip install "visual-token-compression[fast]"``,
also in ``[dev]``): ``lof.py`` imports this module on first use and, without numba or off the CPU, runs its
torch form (``lof.cpu_kernel()`` says which).

What it computes, for rows already sorted ascending (invalid entries after the valid ones): exactly what
``lof._factors`` computes for float64, bit for bit (tests/test_lof.py checks every path against it):
  * per row, L valid entries, k = min(n_neighbors, L - 1), brute force when k >= L // 2 (scikit-learn's
    ``algorithm="auto"``), otherwise the KD-tree's exact ``(x - y) ** 2`` ranking and ``|x - y|`` distances;
    brute force ranks by ``(x * x + -2 * (x * y)) + y * y`` clipped at 0 and returns its (correctly rounded) root;
  * the k nearest other entries of each entry by merging its left and right neighbours, nearest first, the
    left (lower) one on a tie;
  * ``lrd = 1 / (mean(max(d, k_distance(o))) + 1e-10)`` and ``factor = mean(lrd(o) / lrd(p))``, each mean in
    numpy's pairwise order (fewer than 8 terms one by one; else eight interleaved partial sums combined as a
    tree, then the remaining terms one by one), divided by k.
Only float64 and k <= 128 take this path (``lof._factors`` checks): float32 rounds every step after the
distances to float32, and beyond 128 neighbours the torch form sums in its own order.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


def sorted_factors(ordered: torch.Tensor, count: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """(B, n) float64 LOF factors at the sorted positions of ``ordered`` (B, n) float64 (each row ascending, its
    ``count[b]`` valid entries first); entries past a row's count, and rows of fewer than 2, get 0."""
    values = ordered.contiguous().numpy()
    counts = count.to(torch.int64).contiguous().numpy()
    out = np.zeros(values.shape, dtype=np.float64)
    _factors_rows(values, counts, int(n_neighbors), out)
    return torch.from_numpy(out)


@numba.njit(cache=True, inline="always")
def _squared(x, y, brute):
    """scikit-learn's squared distance (lof._squared): KD-tree ``(x - y)**2``; brute force the GEMM expansion."""
    if brute:
        expanded = (x * x + -2.0 * (x * y)) + y * y
        return expanded if expanded > 0.0 else 0.0
    diff = x - y
    return diff * diff


@numba.njit(cache=True, inline="always")
def _pairwise_mean(terms, k):
    """numpy's pairwise sum of terms[:k] (k <= 128), divided by k (lof._pairwise_sum, then _mean)."""
    if k < 8:
        total = 0.0
        for j in range(k):
            total = total + terms[j]
        return total / k
    p0, p1, p2, p3 = terms[0], terms[1], terms[2], terms[3]
    p4, p5, p6, p7 = terms[4], terms[5], terms[6], terms[7]
    blocked = k - k % 8
    for start in range(8, blocked, 8):
        p0 = p0 + terms[start]
        p1 = p1 + terms[start + 1]
        p2 = p2 + terms[start + 2]
        p3 = p3 + terms[start + 3]
        p4 = p4 + terms[start + 4]
        p5 = p5 + terms[start + 5]
        p6 = p6 + terms[start + 6]
        p7 = p7 + terms[start + 7]
    total = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))
    for j in range(blocked, k):
        total = total + terms[j]
    return total / k


@numba.njit(cache=True, nogil=True)
def _merge_exact(x, size, k, padded, neighbour, distance):
    """The KD-tree rows' merge: exact squares, distances |x - y|. The row sits in ``padded`` between guards of
    -inf and +inf (a guard's square is inf, never nearer than an entry), so the steps need no bounds tests, and
    unsigned indices need no negative-index wrap: twice as fast as the bounds-tested form below."""
    guard = np.uint64(k + 1)
    for t in range(k + 1):
        padded[t] = -np.inf
        padded[size + k + 1 + t] = np.inf
    for t in range(size):
        padded[guard + np.uint64(t)] = x[t]
    one = np.uint64(1)
    for i in range(size):
        centre = guard + np.uint64(i)
        xi = padded[centre]
        left, right = centre - one, centre + one
        left_sq, right_sq = _squared(xi, padded[left], False), _squared(xi, padded[right], False)
        for rank in range(k):
            take_left = left_sq <= right_sq  # the left one on a tie
            j = left if take_left else right
            if take_left:
                left -= one
                left_sq = _squared(xi, padded[left], False)
            else:
                right += one
                right_sq = _squared(xi, padded[right], False)
            neighbour[i, rank] = j - guard
            distance[i, rank] = abs(padded[j] - xi)


@numba.njit(cache=True, nogil=True)
def _merge_brute(x, size, k, neighbour, distance):
    """The brute-force rows' merge (at most 2k + 1 entries): expanded squares, which are NaN against an infinite
    guard, so the sides' ends are tested instead; distances are the squares' correctly rounded roots."""
    for i in range(size):
        xi = x[i]
        left, right = i - 1, i + 1
        left_sq = _squared(xi, x[left], True) if left >= 0 else 0.0  # a side's next candidate, squared
        right_sq = _squared(xi, x[right], True) if right < size else 0.0
        for rank in range(k):
            if right >= size or (left >= 0 and left_sq <= right_sq):  # the left one on a tie
                j, chosen = left, left_sq
                left -= 1
                if left >= 0:
                    left_sq = _squared(xi, x[left], True)
            else:
                j, chosen = right, right_sq
                right += 1
                if right < size:
                    right_sq = _squared(xi, x[right], True)
            neighbour[i, rank] = np.uint64(j)
            distance[i, rank] = np.sqrt(chosen)


@numba.njit(cache=True, nogil=True)
def _factors_rows(values, counts, n_neighbors, out):
    rows, n = values.shape
    width = min(n_neighbors, n - 1) if n > 1 else 1
    neighbour = np.empty((n, width), dtype=np.uint64)  # sorted positions of each entry's neighbours, nearest first
    distance = np.empty((n, width), dtype=np.float64)
    padded = np.empty(n + 2 * width + 2, dtype=np.float64)
    kth = np.empty(n, dtype=np.float64)
    lrd = np.empty(n, dtype=np.float64)
    terms = np.empty(width, dtype=np.float64)
    for b in range(rows):
        x = values[b]
        size = counts[b]
        if size < 2:
            continue
        k = min(n_neighbors, size - 1)
        if k >= size // 2:  # scikit-learn's brute force
            _merge_brute(x, size, k, neighbour, distance)
        else:
            _merge_exact(x, size, k, padded, neighbour, distance)
        for i in range(size):
            kth[i] = distance[i, k - 1]
        for i in range(size):
            for rank in range(k):
                reach = kth[neighbour[i, rank]]
                terms[rank] = distance[i, rank] if distance[i, rank] >= reach else reach
            lrd[i] = 1.0 / (_pairwise_mean(terms, k) + 1e-10)
        for i in range(size):
            for rank in range(k):
                terms[rank] = lrd[neighbour[i, rank]] / lrd[i]
            out[b, i] = _pairwise_mean(terms, k)
