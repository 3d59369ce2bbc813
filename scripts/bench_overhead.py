"""Each method's own overhead (signals + selection) as a share of a real-shape CLIP ViT-L/14-336 forward.

    python scripts/bench_overhead.py [--reps 5] [--budget 64]

Random weights built from configs (vtc.shapes): LLaVA-1.5's vision tower (24 layers,
d=1024, 16 heads, 336 px, patch 14: 576 patches), one decoder layer of the LLM (it
plays no part here), and CLIP ViT-L/14's text tower (12 layers, d=768) for the text score. The baseline is the stock tower forward LLaVA runs anyway
(SDPA, hidden states kept). A method's overhead is what it adds: signal
extraction beyond that forward (negative when a method lets the tower stop
early) + the CLIP text tower where needed + selection. Timings are medians over
interleaved repetitions in one process; compare the ratios, not the absolute ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vtc.methods import Budget, available, get
from vtc.models.llava import LlavaAdapter
from vtc.shapes import build_llava15, clip_text_scorer_vit_l


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", default="64")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_llava15(llm_layers=1)  # the language model plays no part here
    adapter = LlavaAdapter(model, clip_text_scorer_vit_l())
    pixels = torch.randn(1, 3, 336, 336)
    question = ["what color is the small triangle on the left ?"]
    methods = [get(name) for name in available()]
    budget = Budget.parse(args.budget)

    tower, signal_ms, select_ms = [], {m.name: [] for m in methods}, {m.name: [] for m in methods}
    with torch.no_grad():
        model.model.vision_tower(pixels, output_hidden_states=True)  # warm-up
        for _ in range(args.reps):
            tower.append(timed(lambda: model.model.vision_tower(pixels, output_hidden_states=True)))
            for m in methods:
                holder = {}
                b = budget if (not budget.is_auto or m.supports_auto) else Budget.parse(64)
                b = Budget.parse("auto") if m.name == "none" else b
                grid = m.input_grid(b, adapter.grid)
                signal_ms[m.name].append(
                    timed(lambda: holder.setdefault("s", adapter.signals(pixels, m.needs, m.attention, question, grid=grid, text=m.text)))
                )
                select_ms[m.name].append(timed(lambda: m.select(holder["s"], b)))

    base = statistics.median(tower)
    print(f"stock ViT-L/14-336 forward (SDPA, batch 1): {base:.1f} ms median of {args.reps}")
    print(f"{'method':<14}{'signals ms':>12}{'select ms':>12}{'overhead ms':>13}{'share of tower':>16}")
    for m in methods:
        sig, sel = statistics.median(signal_ms[m.name]), statistics.median(select_ms[m.name])
        overhead = sig - base + sel
        print(f"{m.name:<14}{sig:>12.1f}{sel:>12.2f}{overhead:>13.1f}{100 * overhead / base:>15.1f}%")


if __name__ == "__main__":
    main()
