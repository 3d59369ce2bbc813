"""Local Outlier Factor on 1-D scores: scikit-learn's labels, batched in torch.

``lof_outliers(scores, k, valid, dtype)`` labels, for every row of ``scores`` (B, n), the entries that
``sklearn.neighbors.LocalOutlierFactor(n_neighbors=min(k, L - 1), contamination="auto")
.fit_predict(row[valid].reshape(-1, 1))`` labels -1, L being the row's number of valid entries (rows with
L < 3 have no outliers). It runs on the scores' device with tensor operations only: no numpy, no host
synchronisation, no Python loop over rows or entries (the loops below run over the k neighbour ranks). On the
CPU, where reading a value costs no synchronisation, a masked batch whose rows all share k and the algorithm
takes the one-k path of full rows (``_uniform``; a few hundred operations fewer, the same numbers).

What scikit-learn 1.9 computes, and how it is reproduced here
-------------------------------------------------------------
* Input precision: the scores are first rounded to ``dtype`` (float32 is a float32 numpy input, float64 a
  float64 one). Distances are computed in float64 in both cases, as scikit-learn does; with float32 input
  it casts them to float32 and computes everything after that in float32.
* Neighbour search: ``algorithm="auto"`` takes brute force when ``k >= L // 2`` (k after the clamp to
  L - 1), a KD-tree otherwise (so rows of more than 2k + 1 entries use the tree), decided per row here.
  The KD-tree (float64 data) ranks by ``(x - y) ** 2`` and returns its root, which is ``|x - y|`` exactly
  (computed so; the two differ only if a difference is below 1e-154 or above 1e154). Brute force ranks by
  the GEMM expansion ``(x * x + -2 * (x * y)) + y * y`` clipped at 0 and returns its root, so its distances
  are slightly off for close points; with float32 input the squared distance is rounded to float32 before
  the root (``EuclideanDistance32._rdist_to_dist`` takes a float32). Roots are correctly rounded as numpy's
  are (torch's vectorised sqrt is not: ``_sqrt`` corrects it).
* In 1-D, after sorting a row, the k nearest other entries of the entry at sorted position i are a window
  i - a .. i + k - a (without i): a merge of its left and right neighbours, nearest first, which also
  gives them in the order of increasing distance in which scikit-learn returns and sums them. No N x N
  matrix: the merge is either a loop over the k neighbour ranks (a few (B, n) operations each; brute-force
  rows, and large CPU batches) or, for the KD-tree rows, a fixed dozen operations on the (B, n, k) windows
  (``_window_neighbours``; cheaper where each operation has a fixed cost, as on an accelerator). Both give
  the same neighbours (tested). With a mask, brute-force rows are computed on their leading 2k + 1 columns.
* The sample itself: scikit-learn asks for k + 1 neighbours and drops the sample, or, when k + 1 duplicates
  hide it, the first duplicate. Either way the k neighbours are the k nearest *other* entries, and the
  choice among exact duplicates changes no density (equal scores have equal k-distances and densities).
* Local reachability density ``1 / (mean(max(d(p, o), k_distance(o))) + 1e-10)``, the factor
  ``mean(lrd(o) / lrd(p))``, and the label ``-factor < -1.5`` (strict), in numpy's summation order:
  ``np.mean`` over a row of neighbours is a pairwise sum (fewer than 8 terms one by one; else eight
  interleaved partial sums combined as a tree, then the remainder one by one: ``_pairwise_sum``). So the
  factors equal scikit-learn's bit for bit when no two neighbours are equidistant (tests/test_lof.py checks
  this; beyond 128 neighbours a plain sum is used, which may differ in the last bit).

Ties (equidistant neighbours)
-----------------------------
When the k-th nearest distance d is shared by entries on both sides (scores p - d and p + d) and not all of
them fit, the multiset of the k distances is fixed but the choice between the two sides changes which
densities are averaged. scikit-learn's choice is an accident of its max-heap: a candidate at the current
k-th distance is rejected, a closer one evicts whichever tied entry sits at the heap's root, and the
candidates come in the KD-tree's order (leaves in ``std::nth_element`` order) or, for brute force, in row
order. That cannot be reproduced without rebuilding the tree and replaying the heap. The rule here:
**among equidistant neighbours the lower score comes first** (in sorted order: the left one), which makes
every result a function of the score alone. On rows rounded to a coarse grid, the KD-tree kept all of the
lower side in 62% of such ties, all of the upper side in 12%, a mixture in the rest; brute force has no
side preference. Tied distances also come out of scikit-learn's sort in an arbitrary order, so factors
can differ in the last bit there.

Exact duplicates are never ambiguous, so scores with many copies of one value (the masked text scores of
Recoverable Compression, the kept patches set to the minimum) give scikit-learn's labels; only two-sided
ties at the k-th distance with different densities can change a label. Measured against scikit-learn 1.9.1
(rows of 3-700 entries, half of them 576; ``python scripts/bench_lof.py --agreement ROWS`` repeats this):
masked text scores (5-30% of a row set to its minimum): 0 of 6,000 rows differ (k = 20 and 10, float32
and float64); scores rounded to fp16: 2.5% of 1,000 rows differ in their outlier count at k = 20, 15% of
600 at k = 10; scores on a 1/8 grid: 33% of 1,000 rows at k = 20. Continuous scores: no difference, and
the factors are bit-identical.

Scores must be finite: on the CPU this is checked (free there), on an accelerator it is not (a check
would synchronise); vtc validates finiteness where the signals are made.

On the CPU, float64 scores with at most 128 neighbours take ``lof_cpu``'s compiled loop when numba is installed
(the ``fast`` extra, also in ``dev``): the same factors bit for bit (tests/test_lof.py runs every test on both
forms, tests/test_lof_cpu.py compares them directly), 2-5x faster per call (0.11-0.16 ms per 576-score row,
sort and checks included, against 0.27-0.74 ms for the torch form's ~100 tensor operations, at batch 1 to 64);
``USE_CPU_KERNEL = False`` switches it off. The torch form stays the path of accelerators, of float32 scores
(the published code's precision) and of installs without numba.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import VTCError

LRD_EPSILON = 1e-10  # scikit-learn's guard against a zero mean reachability distance (duplicates)
OFFSET = 1.5  # contamination="auto": an entry is an outlier when -factor < -1.5
PAIRWISE_BLOCKSIZE = 128  # numpy sums at most this many terms with its unrolled loop before recursing
ACCUMULATORS = 8  # numpy's unrolled pairwise sum keeps eight partial sums
WINDOW_MAX_CPU_ENTRIES = 2048  # on the CPU, larger batches of scores find neighbours with the merge loop
USE_CPU_KERNEL = True  # float64 CPU scores go through lof_cpu's compiled loop when numba is there (False: torch form)
_CPU_KERNEL = None  # the lof_cpu module once imported, False when numba is missing


def cpu_kernel():
    """``lof_cpu`` (the compiled CPU loop that float64 CPU scores take), or None: numba missing or switched off."""
    global _CPU_KERNEL
    if _CPU_KERNEL is None:
        try:
            from . import lof_cpu
        except ImportError:  # numba is an extra ("fast", in "dev"): the torch form computes the same
            _CPU_KERNEL = False
        else:
            _CPU_KERNEL = lof_cpu
    return _CPU_KERNEL if USE_CPU_KERNEL and _CPU_KERNEL else None


def lof_outlier_counts(
    scores: Tensor, n_neighbors: int, valid: Tensor | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """(B,) long: per row, how many valid entries scikit-learn's LOF labels as outliers (module docstring)."""
    return lof_outliers(scores, n_neighbors, valid, dtype).sum(-1)


def lof_outliers(
    scores: Tensor, n_neighbors: int, valid: Tensor | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """(B, n) bool: the valid entries scikit-learn's LOF labels -1; rows with fewer than 3 valid entries have none."""
    factors, valid, count = _factors(scores, n_neighbors, valid, dtype)
    return (-factors < -OFFSET) & valid & (count >= 3).unsqueeze(-1)


def local_outlier_factors(
    scores: Tensor, n_neighbors: int, valid: Tensor | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """(B, n) ``dtype``: scikit-learn's ``-negative_outlier_factor_`` per valid entry (NaN elsewhere and in
    rows with fewer than 2 valid entries), with ``n_neighbors`` clamped to L - 1 as in ``lof_outliers``."""
    factors, valid, count = _factors(scores, n_neighbors, valid, dtype)
    return torch.where(valid & (count >= 2).unsqueeze(-1), factors, torch.nan)


# ----------------------------------------------------------------------------- internals


def _check(scores: Tensor, n_neighbors: int, valid: Tensor | None, dtype: torch.dtype) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise VTCError(f"LOF scores: expected a floating (batch, n) tensor, got {shape}")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise VTCError(f"LOF n_neighbors: expected an int >= 1, got {n_neighbors!r}")
    if dtype not in (torch.float32, torch.float64):
        raise VTCError(f"LOF dtype: expected torch.float32 or torch.float64, got {dtype}")
    if valid is None:
        valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    elif not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != scores.shape:
        got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, Tensor) else type(valid).__name__
        raise VTCError(f"LOF valid: expected a bool tensor of the scores' shape {tuple(scores.shape)}, got {got}")
    elif valid.device != scores.device:
        raise VTCError(f"LOF valid: on {valid.device}, the scores on {scores.device}")
    if scores.device.type == "cpu" and not bool(torch.isfinite(scores).logical_or(~valid).all()):
        raise VTCError("LOF scores: valid entries must be finite (found NaN or inf)")
    return valid


def _factors(scores: Tensor, n_neighbors: int, valid: Tensor | None, dtype: torch.dtype):
    """Per entry LOF factor (garbage where invalid), the valid mask and the rows' valid counts."""
    masked = valid is not None
    valid = _check(scores, n_neighbors, valid, dtype)
    batch, n = scores.shape
    count = valid.sum(-1)
    if n < 2:
        return torch.zeros(scores.shape, dtype=dtype, device=scores.device), valid, count
    values = torch.where(valid, scores.to(dtype).to(torch.float64), torch.inf)  # invalid entries sort last
    ordered, order = values.sort(dim=-1)  # equal scores get equal results: their order does not matter
    kernel = cpu_kernel() if scores.device.type == "cpu" and dtype == torch.float64 else None
    if kernel is not None and n_neighbors <= PAIRWISE_BLOCKSIZE:  # the same numbers, one compiled loop per row
        factor = kernel.sorted_factors(ordered, count, n_neighbors)
        return torch.empty_like(factor).scatter_(-1, order, factor), valid, count
    width = min(n_neighbors, n - 1)  # neighbour ranks computed; a row uses the first k of them
    if masked:
        k = (count - 1).clamp(min=1, max=n_neighbors)  # scikit-learn's n_neighbors_ per row
        brute = (k >= count // 2).view(-1, 1, 1)
        if scores.device.type == "cpu":  # reading sizes costs no synchronisation here: take the uniform path
            k, brute = _uniform(k, brute)
            width = k if isinstance(k, int) else width
    else:  # every row is a full row: one k, one algorithm
        k, brute = width, (True if width >= n // 2 else None)
    padded = _padded(ordered, width, torch.inf)
    if brute is None or brute is True:  # one algorithm for every row
        # (w, B, n) padded positions, nearest first
        position = _exact_neighbours(padded, ordered, width) if brute is None else _neighbours(padded, ordered, width, True)
        neighbour = _at(padded, position)
        if brute is None:  # KD-tree: sqrt((x - y)**2) == |x - y| (no under- or overflow for sane scores)
            distance = (neighbour - ordered).abs().to(dtype)
        else:
            distance = _brute_distance(ordered, neighbour, dtype)
    else:
        # Rows differ: a brute-force row has at most 2 * n_neighbors + 1 valid entries (k >= L // 2), and its
        # valid entries sort first, so its own computation needs only that many leading columns; the KD-tree
        # computation serves every column of every row. Rows are independent, so the results are combined
        # row by row: the same as running each row alone, with no host synchronisation to find the rows.
        head = min(n, 2 * n_neighbors + 1)
        position = _exact_neighbours(padded, ordered, width)
        neighbour = _at(padded, position)
        distance = (neighbour - ordered).abs().to(dtype)
        rows = brute.view(1, batch, 1)
        head_position = _neighbours(padded, ordered[:, :head], width, True)
        head_neighbour = _at(padded, head_position)
        position[..., :head] = torch.where(rows, head_position, position[..., :head])
        head_distance = _brute_distance(ordered[:, :head], head_neighbour, dtype)
        distance[..., :head] = torch.where(rows, head_distance, distance[..., :head])
    kth = distance[k - 1] if isinstance(k, int) else distance.gather(0, (k - 1).view(1, batch, 1).expand(1, batch, n))[0]
    reach = torch.maximum(distance, _at(_padded(kth, width, 0.0), position))
    lrd = 1.0 / (_mean(reach, k) + LRD_EPSILON)  # (B, n)
    factor = _mean(_at(_padded(lrd, width, 1.0), position) / lrd, k)
    return torch.empty_like(factor).scatter_(-1, order, factor), valid, count


def _uniform(k: Tensor, brute: Tensor) -> tuple[Tensor | int, Tensor | bool | None]:
    """Per-row neighbour counts and algorithms as one int / one algorithm (None: KD-tree, True: brute force)
    where every row shares them, as in the full rows of a batch of same-size images; otherwise unchanged. The
    uniform computation equals the per-row one (the same neighbours and sums) in a few hundred fewer operations."""
    low, high = (int(v) for v in torch.aminmax(k))
    brute_rows = int(brute.sum())
    algorithm = None if brute_rows == 0 else True if brute_rows == brute.numel() else brute
    return (low if low == high else k), algorithm


def _brute_distance(ordered: Tensor, neighbour: Tensor, dtype: torch.dtype) -> Tensor:
    """Brute force's distances: the root of the GEMM-expanded squared distance, which for a float32 input is
    rounded to float32 before the root."""
    squared = _squared(ordered, neighbour, True)
    return _sqrt(squared.to(dtype).to(torch.float64)).to(dtype)


def _padded(rows: Tensor, width: int, fill: float) -> Tensor:
    """(B, w + n + w): ``rows`` with ``-fill`` before and ``fill`` after (padded position = position + w)."""
    pad = torch.full((rows.shape[0], width), fill, dtype=rows.dtype, device=rows.device)
    return torch.cat([-pad, rows, pad], dim=-1)


def _at(rows: Tensor, index: Tensor) -> Tensor:
    """rows (B, m) at index (w, B, n): (w, B, n)."""
    return rows.unsqueeze(0).expand(index.shape[0], -1, -1).gather(-1, index)


def _window_neighbours(padded: Tensor, ordered: Tensor, width: int) -> Tensor:
    """``_neighbours`` for exact squared distances (the KD-tree's ``(x - y)**2``), in a fixed number of tensor
    operations instead of one merge step per rank. In a sorted row the squared distance to the j-th entry on
    either side never decreases with j (rounding is monotone), so the merge of the two sides takes the a-th
    left neighbour iff it is not farther than the (k - a + 1)-th right one: the count of such a is how many
    left neighbours the k nearest include. The k chosen, lefts first, then go through a stable sort by
    distance, which puts a left before a right at equal distance, as the merge does."""
    batch, n = ordered.shape
    window = padded.unfold(1, 2 * width + 1, 1)  # (B, n, 2w + 1): entry i at the middle of window i (a view)
    x = ordered.unsqueeze(-1)
    left_square = (x - window[..., :width].flip(-1)) ** 2  # (B, n, w): the j-th left neighbour at j - 1
    right_square = (x - window[..., width + 1 :]) ** 2
    lefts = (left_square <= right_square.flip(-1)).sum(-1, keepdim=True)  # left neighbours among the k
    slot = torch.arange(width, device=ordered.device)
    from_left = slot < lefts
    right_rank = (slot - lefts).clamp(min=0)
    square = torch.where(from_left, left_square, right_square.gather(-1, right_rank))
    centre = torch.arange(width, width + n, device=ordered.device).view(1, n, 1)  # padded position of each entry
    position = torch.where(from_left, centre - 1 - slot, centre + 1 + right_rank)
    chosen = position.gather(-1, torch.sort(square, dim=-1, stable=True).indices)  # (B, n, w), nearest first
    return chosen.permute(2, 0, 1).contiguous()


def _exact_neighbours(padded: Tensor, ordered: Tensor, width: int) -> Tensor:
    """The KD-tree rows' neighbours by whichever of two equal computations costs less: the window form (a
    fixed dozen operations) where operations are dear, i.e. on an accelerator or for a small CPU batch; the
    merge loop (2w cheap operations, no sort of many short rows, which the CPU does slowly) on a large CPU
    batch. Measured on one quiet CPU thread, k = 20 (loop / window, ms): 1 x 576 scores 1.8 / 0.7, 4 x 576
    2.6 / 2.2, 1 x 2880 1.6 / 2.7, 16 x 576 2.7 / 12.0."""
    if ordered.device.type != "cpu" or ordered.numel() <= WINDOW_MAX_CPU_ENTRIES:
        return _window_neighbours(padded, ordered, width)
    return _neighbours(padded, ordered, width, None)


def _neighbours(padded: Tensor, ordered: Tensor, width: int, brute: Tensor | bool | None) -> Tensor:
    """Padded positions (w, B, n) of each sorted entry's ``width`` nearest others, nearest first, the left
    (lower) one first on a tie: a merge, one rank per step, of its left and right neighbours. The padding
    (-inf before, +inf after, like the invalid entries) is never nearer than a valid entry."""
    batch, n = ordered.shape
    start = torch.arange(width - 1, width - 1 + n, device=ordered.device)
    nearest = torch.stack([start, start + 2]).expand(batch, 2, n).contiguous()  # nearest left, right not taken
    positions = torch.empty((width, batch, n), dtype=torch.long, device=ordered.device)
    go_left = torch.empty((batch, 1, n), dtype=torch.long, device=ordered.device)
    for rank in range(width):  # nearest right = nearest left + rank + 2
        square = _squared(ordered.unsqueeze(1), padded.gather(-1, nearest.view(batch, 2 * n)).view(batch, 2, n), brute)
        torch.le(square[:, :1], square[:, 1:], out=go_left)  # 1: take the left one (on a tie too), 0: the right one
        torch.add(nearest[:, 1], go_left[:, 0], alpha=-(rank + 2), out=positions[rank])
        nearest -= go_left
        nearest[:, 1] += 1
    return positions


def _sqrt(x: Tensor) -> Tensor:
    """Correctly rounded float64 square root, as numpy's (torch's vectorised sqrt is off by one ulp in about
    1% of cases): of the approximation and its two neighbours, the one whose square is nearest x, the squares
    computed exactly (Dekker's product)."""
    root = x.sqrt()
    best, best_error = root, _square_error(root, x)
    above = torch.nextafter(root, torch.full_like(root, torch.inf))
    below = torch.nextafter(root, torch.zeros_like(root))
    for candidate in (above, below):
        error = _square_error(candidate, x)
        closer = error < best_error
        best, best_error = torch.where(closer, candidate, best), torch.where(closer, error, best_error)
    return best


def _square_error(root: Tensor, x: Tensor) -> Tensor:
    """|root * root - x|, with root * root = product + error exactly (Veltkamp split, Dekker's product)."""
    scaled = root * 134217729.0  # 2**27 + 1
    high = scaled - (scaled - root)
    low = root - high
    product = root * root
    error = ((high * high - product) + 2.0 * high * low) + low * low
    return ((x - product) - error).abs()


def _squared(centre: Tensor, other: Tensor, brute: Tensor | bool | None) -> Tensor:
    """scikit-learn's squared distance: KD-tree ``(x - y)**2``; brute force ``(x*x - 2xy) + y*y`` clipped at 0."""
    diff = centre - other
    exact = diff * diff  # inf when other is +-inf (padding, invalid entries)
    if brute is None:
        return exact
    expanded = ((centre * centre + -2.0 * (centre * other)) + other * other).clamp(min=0.0)
    expanded = torch.where(torch.isinf(exact), exact, expanded)  # the expansion is NaN against inf
    return expanded if brute is True else torch.where(brute, expanded, exact)


def _mean(terms: Tensor, k: Tensor | int) -> Tensor:
    """np.mean over the first k[b] of the w terms of (w, B, n), in numpy's summation order: (B, n)."""
    if not isinstance(k, int):  # rows with fewer terms: zeros past k[b] (adding an exact zero changes nothing)
        k = k.view(-1, 1)
        terms = torch.where(torch.arange(terms.shape[0], device=terms.device).view(-1, 1, 1) < k, terms, 0.0)
    return _pairwise_sum(terms, k) / k


def _pairwise_sum(terms: Tensor, k: Tensor | int) -> Tensor:
    """numpy's pairwise sum over dim 0 of (w, B, n), of the first k terms (k: an int or (B, 1); the rest are 0).

    numpy sums fewer than 8 terms one by one; up to 128 terms in eight interleaved partial sums
    (r_j = t_j + t_{j+8} + ...) over the largest multiple of 8, combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)),
    then adds the remaining terms one by one. With a per-row k, each row has its own multiple of 8.
    """
    width = terms.shape[0]
    if width > PAIRWISE_BLOCKSIZE:
        return terms.sum(0)  # numpy recurses here; not reproduced (differences in the last bits only)
    uniform = isinstance(k, int)
    blocked = k - k % ACCUMULATORS  # how many terms the partial sums take (per row, or one int)
    total = torch.zeros_like(terms[0])
    if width >= ACCUMULATORS:
        partial = terms[:ACCUMULATORS]
        for start in range(ACCUMULATORS, width - width % ACCUMULATORS, ACCUMULATORS):
            block = terms[start : start + ACCUMULATORS]
            partial = partial + (block if uniform else torch.where(start < blocked, block, 0.0))
        pairs = partial[0::2] + partial[1::2]
        quads = pairs[0::2] + pairs[1::2]
        tree = quads[0] + quads[1]
        total = tree if uniform else torch.where(blocked > 0, tree, total)
    if uniform:
        for j in range(blocked, width):
            total = total + terms[j]
        return total
    for step in range(ACCUMULATORS - 1):  # each row's remaining terms, one by one
        index = (blocked + step).clamp(max=width - 1).unsqueeze(0)  # (1, B, 1)
        term = terms.gather(0, index.expand(1, -1, terms.shape[2]))[0]
        total = total + torch.where(blocked + step < width, term, 0.0)
    return total
