"""Time per image of the torch LOF (vtc.methods.lof) against scikit-learn's, on one CPU thread.

    python scripts/bench_lof.py [--reps 20] [--n 576] [--neighbors 20]

Rows are CLS-attention-like scores (a softmax over n tokens); scikit-learn runs one
LocalOutlierFactor(...).fit_predict per row as vtc's per-image reference does. Both are timed in
the same process (median over --reps calls), with torch.set_num_threads(1). The last column is
how many rows' outlier counts differ between the two (0 expected: random scores have no ties).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.neighbors import LocalOutlierFactor

from vtc.methods.lof import lof_outlier_counts


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--n", type=int, default=576)
    parser.add_argument("--neighbors", type=int, default=20)
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


if __name__ == "__main__":
    main()
