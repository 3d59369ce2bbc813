"""Selection time of every method on 576 real-shape tokens, at 64 / 128 / 192 tokens.

    python scripts/bench_selection.py [--reps 20] [--budgets 64,128,192]

Signals have LLaVA-1.5-7B shapes (576 patches on 24 x 24, features 1024-d, keys 1024-d
or 64-d head means, projected tokens 4096-d) with random values; selection cost
depends on shapes, not values. The reference is one stock forward of a random-weight
CLIP ViT-L/14-336 at batch 1 (SDPA), measured in the same process. Signal extraction
is not included here (see scripts/bench_overhead.py); ``downsample`` is left out
because its cost is a smaller tower forward, not a selection.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vtc.methods import Budget, Signals, available, get
from vtc.shapes import build_llava15


def real_shape_signals(method, n=576, d=1024, grid=(24, 24)) -> Signals:
    g = torch.Generator().manual_seed(0)
    keys_dim = 64 if method.attention.keys == "head_mean" else d
    return Signals(
        features=torch.randn(1, n, d, generator=g),
        grid=grid,
        cls_attn=torch.randn(1, n, generator=g).mul(2).softmax(-1),
        keys=torch.randn(1, n, keys_dim, generator=g),
        text_sim=torch.rand(1, n, generator=g) * 0.3,
        projected=torch.randn(1, n, 4096, generator=g),
        received_attn=torch.rand(1, n, generator=g) / n,
        cls_feature=torch.randn(1, d, generator=g),
    )


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budgets", default="64,128,192")
    args = parser.parse_args()
    budgets = [Budget.parse(b) for b in args.budgets.split(",")]
    model = build_llava15(llm_layers=1)
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        tower = median_ms(lambda: model.model.vision_tower(pixels, output_hidden_states=True), max(3, args.reps // 5))
    print(f"stock CLIP ViT-L/14-336 forward, batch 1: {tower:.0f} ms (median)")
    print(f"{'method':<14}" + "".join(f"{f'{b} tok ms':>12}{'% tower':>9}" for b in budgets))
    for name in available():
        if name in ("none", "downsample") or getattr(get(name), "in_llm", False):  # in-LLM methods: see vtc speed
            continue
        method = get(name)
        signals = real_shape_signals(method)
        row = f"{name:<14}"
        for b in budgets:
            ms = median_ms(lambda: method.select(signals, b), args.reps)
            row += f"{ms:>12.2f}{100 * ms / tower:>8.2f}%"
        print(row, flush=True)


if __name__ == "__main__":
    main()
