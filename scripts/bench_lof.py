"""Time per image of the torch LOF (vtc.methods.lof) against scikit-learn's, on one CPU thread.

    python scripts/bench_lof.py [--reps 20] [--n 576] [--neighbors 20] [--agreement ROWS]

Rows are CLS-attention-like scores (a softmax over n tokens); scikit-learn runs one
LocalOutlierFactor(...).fit_predict per row as vtc's per-image reference does. Both are timed in
the same process (median over --reps calls), with torch.set_num_threads(1). The last column is
how many rows' outlier counts differ between the two (0 expected: random scores have no ties).
``--agreement ROWS`` also counts, on ROWS tie-heavy rows of each kind (sizes 3-700, half of them 576),
the rows whose outlier count / outlier mask differ from scikit-learn's (see vtc.methods.lof, "Ties").
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.neighbors import LocalOutlierFactor

from vtc.methods.lof import lof_outlier_counts, lof_outliers


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sklearn_counts(scores: torch.Tensor, n_neighbors: int, dtype: torch.dtype) -> list[int]:
    counts = []
    for row in scores.to(dtype).numpy():
        lof = LocalOutlierFactor(n_neighbors=min(n_neighbors, row.size - 1), contamination="auto")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            counts.append(int((lof.fit_predict(row.reshape(-1, 1)) == -1).sum()))
    return counts


def tie_heavy_row(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    row = rng.normal(size=n) * rng.uniform(0.01, 3)
    if kind == "masked":  # Recoverable Compression's masked text scores: 5-30% set to the row minimum
        row = rng.random(n) * 0.3
        row[rng.random(n) < rng.uniform(0.05, 0.3)] = row.min()
        return row
    if kind == "fp16":
        return (row * 0.05 + 0.2).astype(np.float16).astype(np.float64)
    return np.round(row * rng.choice([2, 5, 20])) / 8  # a coarse grid


def agreement(rows: int, n_neighbors: int, dtype: torch.dtype, kind: str) -> tuple[int, int]:
    """(rows whose outlier count differs, rows whose outlier mask differs) from scikit-learn's."""
    rng = np.random.default_rng(0)
    counts = masks = 0
    for _ in range(rows):
        row = tie_heavy_row(rng, 576 if rng.random() < 0.5 else int(rng.integers(3, 701)), kind)
        mine = lof_outliers(torch.from_numpy(row)[None], n_neighbors, dtype=dtype)[0].numpy()
        lof = LocalOutlierFactor(n_neighbors=min(n_neighbors, row.size - 1), contamination="auto")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            numpy_row = row.astype(np.float32 if dtype == torch.float32 else np.float64)
            theirs = lof.fit_predict(numpy_row.reshape(-1, 1)) == -1
        counts += int(mine.sum() != theirs.sum())
        masks += int((mine != theirs).any())
    return counts, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--n", type=int, default=576)
    parser.add_argument("--neighbors", type=int, default=20)
    parser.add_argument("--agreement", type=int, default=0, metavar="ROWS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print(f"n={args.n}, n_neighbors={args.neighbors}, 1 thread; ms per image (median of {args.reps} calls)")
    print(f"{'batch':>5} {'dtype':>8} {'torch':>8} {'sklearn':>8} {'speed-up':>9} {'rows differing':>15}")
    for batch in (1, 16, 64):
        scores = torch.randn(batch, args.n, generator=generator).mul(2).softmax(-1)
        for dtype in (torch.float32, torch.float64):
            mine = median_ms(lambda: lof_outlier_counts(scores, args.neighbors, dtype=dtype), args.reps) / batch
            reps = max(3, args.reps // max(1, batch // 4))
            theirs = median_ms(lambda: sklearn_counts(scores, args.neighbors, dtype), reps) / batch
            differ = sum(
                a != b
                for a, b in zip(lof_outlier_counts(scores, args.neighbors, dtype=dtype).tolist(),
                                sklearn_counts(scores, args.neighbors, dtype))
            )
            name = str(dtype).removeprefix("torch.")
            print(f"{batch:>5} {name:>8} {mine:>8.3f} {theirs:>8.3f} {theirs / mine:>8.1f}x {differ:>15}", flush=True)
    if args.agreement:
        print(f"\nrows (of {args.agreement}) differing from scikit-learn: count / mask")
        for kind in ("masked", "fp16", "grid"):
            for dtype in (torch.float32, torch.float64):
                for k in (10, 20):
                    counts, masks = agreement(args.agreement, k, dtype, kind)
                    name = str(dtype).removeprefix("torch.")
                    print(f"{kind:>7} {name:>8} k={k:<3} {counts:>6} / {masks}", flush=True)


if __name__ == "__main__":
    main()
