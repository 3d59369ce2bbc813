"""Issue 21: per-image selection time of the frozen per-image code (tests/naive) vs the batched code.

    python scripts/bench_vectorised.py [--reps 5] [--batches 1,16]

One thread (torch.set_num_threads(1)), 576 tokens on 24 x 24 with LLaVA-1.5-7B shapes and the
value distributions of scripts/bench_selection.py's real_shape_signals, made for a whole batch.
Prints the median ms per image of ``method.select`` for the naive and the new code, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the frozen references: tests/naive

from naive.divprune import DivPrune as NaiveDivPrune  # noqa: E402
from naive.pool import SpatialPool as NaivePool  # noqa: E402
from naive.prumerge import PruMerge as NaivePruMerge  # noqa: E402
from naive.prumerge import PruMergePlus as NaivePruMergePlus  # noqa: E402
from naive.todre import ToDRE as NaiveToDRE  # noqa: E402
from naive.tome import ToMe as NaiveToMe  # noqa: E402

from vtc.methods import Signals, get  # noqa: E402

CASES = [  # (name, options, naive class, budgets)
    ("prumerge", {}, NaivePruMerge, ("auto", 64)),
    ("prumerge+", {}, NaivePruMergePlus, ("auto", 64)),
    ("tome", {}, NaiveToMe, (64,)),
    ("todre", {}, NaiveToDRE, (64,)),
    ("todre", {"objective": "maxsum"}, NaiveToDRE, (64,)),
    ("divprune", {}, NaiveDivPrune, (64,)),
    ("divprune", {"space": "features"}, NaiveDivPrune, (64,)),
    ("pool", {}, NaivePool, (64,)),
]


def batch_signals(method, batch: int, n: int = 576, d: int = 1024, grid=(24, 24)) -> Signals:
    """bench_selection.real_shape_signals for ``batch`` images."""
    g = torch.Generator().manual_seed(0)
    keys_dim = 64 if method.attention.keys == "head_mean" else d
    return Signals(
        features=torch.randn(batch, n, d, generator=g),
        grid=grid,
        cls_attn=torch.randn(batch, n, generator=g).mul(2).softmax(-1),
        keys=torch.randn(batch, n, keys_dim, generator=g),
        text_sim=torch.rand(batch, n, generator=g) * 0.3,
        projected=torch.randn(batch, n, 4096, generator=g),
        received_attn=torch.rand(batch, n, generator=g) / n,
        cls_feature=torch.randn(batch, d, generator=g),
    )


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up (and the one-off finiteness check of the signals)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    print("ms per image, median of", args.reps, "runs, 1 thread, 576 tokens")
    print(f"{'method':<26}{'budget':>7}" + "".join(f"{f'naive b{b}':>11}{f'new b{b}':>9}{'x':>6}" for b in batches))
    for name, options, naive, budgets in CASES:
        new, old = get(name, **options), naive(**options)
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        for budget in budgets:
            row = f"{label:<26}{budget!s:>7}"
            for b in batches:
                signals = batch_signals(new, b)
                t_old = median_ms(lambda: old.select(signals, budget), args.reps) / b
                t_new = median_ms(lambda: new.select(signals, budget), args.reps) / b
                row += f"{t_old:>11.2f}{t_new:>9.2f}{t_old / t_new:>6.1f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
