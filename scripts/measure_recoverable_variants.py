"""Recoverable Compression's published choices, one at a time, on the demo benchmark.

    python scripts/measure_recoverable_variants.py [--test 500 --extra 500] [--out docs/recoverable_variants.json]

Runs the shipped demo model on the test split plus scenes from seeds outside every split, for
``compat="original"``, the default, and the default with each published choice toggled alone, at
'auto' and at 10% of the tokens. Prints a markdown table (accuracy, small-target accuracy, mean tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.progress import Progress

from vtc.demo.evaluate import CHECKPOINT, run_method
from vtc.demo.scenes import make_sample, split_seeds
from vtc.methods import get
from vtc.pipeline import Pipeline

EXTRA_SEEDS = range(7_000_000, 7_100_000)  # outside the train / val / test seed ranges
VARIANTS = {
    "original (published code)": {"compat": "original"},
    "default": {},
    "default, text score x projection_dim^-0.5": {"text_scale": "published"},
    "default, no post_layernorm on patches": {"text_post_layernorm": False},
    "default, centre LOF with 10 neighbours": {"centre_neighbours": 10},
    "default, centres in attention order": {"centre_order": "attention"},
}
BUDGETS = ("auto", 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=500, help="questions from the test split")
    parser.add_argument("--extra", type=int, default=500, help="questions from seeds outside every split")
    parser.add_argument("--out", type=Path, default=Path("docs/recoverable_variants.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: threads only add synchronisation on a busy machine
    seeds = list(split_seeds("test")[: args.test]) + list(EXTRA_SEEDS[: args.extra])
    samples = [make_sample(s) for s in seeds]
    pipe = Pipeline.from_pretrained(CHECKPOINT / "llava", clip=CHECKPOINT / "clip")
    rows = []
    with Progress() as progress:
        for name, options in VARIANTS.items():
            for budget in BUDGETS:
                task = progress.add_task(f"{name} @ {budget}", total=len(samples))
                score = run_method(pipe, samples, get("recoverable", **options), budget, progress=progress, task=task)
                rows.append({"variant": name, "options": options, "budget": budget, **score.summary()})
                progress.console.print(f"{name} @ {budget}: {rows[-1]['accuracy']}% ({rows[-1]['mean_tokens']} tokens)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"questions": len(samples), "rows": rows}, indent=1))
    print(f"\n{len(samples)} questions ({args.test} test split + {args.extra} outside every split)\n")
    print("| variant | budget | accuracy | small-target acc. | mean tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        budget = "auto" if r["budget"] == "auto" else f"{r['budget']:.0%}"
        print(f"| {r['variant']} | {budget} | {r['accuracy']} | {r['small_target_accuracy']} | {r['mean_tokens']} |")


if __name__ == "__main__":
    main()
