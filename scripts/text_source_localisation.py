"""Where the text score points, and what it buys: CLIP's text tower against the LLM's own input embeddings.

    nice -n 10 python scripts/text_source_localisation.py [--limit 300] [--out docs/text_source_localisation.json]

On the demo benchmark's test split (basic scenes, shipped checkpoint), for CLIP and for each pooling of
``EmbeddingTextScorer`` (mean / max / max_content / max_centred):
  (i)  localisation on small-target questions, with the README's definition (``localisation_hit_rate``:
       the top 10% of patches by TEXT_SIM touch the answer's cells) and a stricter one, the argmax alone
       (top 1 patch); per question type too. A random score hits a one-cell target with about 10% / 0.5%.
  (ii) accuracy of ``recoverable`` and ``fastervlm+text`` at 10% of the tokens (budget 0.1) with each source,
       next to full tokens and ``fastervlm`` without text recovery (source-independent references).
One model is loaded; the sources are swapped on its adapter. Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vtc.demo.evaluate import CHECKPOINT, localisation_hit_rate, run_method, test_samples
from vtc.models.embed_text import POOLINGS, EmbeddingTextScorer
from vtc.pipeline import Pipeline

SMALL_QTYPES = ("small_color", "small_shape", "small_exists")
TEXT_METHODS = ("recoverable", "fastervlm+text")
REFERENCES = (("none", "auto"), ("fastervlm", 0.1))
BUDGET = 0.1


def localisation(pipe, samples) -> dict:
    """Hit rates (%) on small-target questions: top 10% (the README's measure) and top 1, overall and per type."""
    small = [s for s in samples if s.small_target]
    row = {"n_small": len(small)}
    for label, fraction in (("top10", 0.10), ("top1", 0.0)):  # fraction 0: k = max(1, 0) = 1, the argmax
        row[label] = round(localisation_hit_rate(pipe, small, fraction), 1)
        for qtype in SMALL_QTYPES:
            subset = [s for s in small if s.qtype == qtype]
            row[f"{label}_{qtype}"] = round(localisation_hit_rate(pipe, subset, fraction), 1)
    return row


def accuracies(pipe, samples) -> dict:
    out = {}
    for method in TEXT_METHODS:
        summary = run_method(pipe, samples, method, BUDGET).summary()
        out[method] = {k: summary[k] for k in ("accuracy", "small_target_accuracy", "mean_tokens", "by_qtype")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="test-split questions (basic scenes)")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--out", type=Path, default=Path("docs/text_source_localisation.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model on a shared machine
    samples = test_samples(args.limit, "basic")
    pipe = Pipeline.from_pretrained(args.checkpoint / "llava", clip=args.checkpoint / "clip")
    sources = {"clip": pipe.adapter.text_scorer}
    sources |= {f"llm/{p}": EmbeddingTextScorer.from_model(pipe.model, pipe.processor.tokenizer, p) for p in POOLINGS}

    report = {"limit": args.limit, "budget": BUDGET, "references": {}, "sources": {}}
    for method, budget in REFERENCES:
        summary = run_method(pipe, samples, method, budget).summary()
        report["references"][f"{method}@{budget}"] = {k: summary[k] for k in ("accuracy", "small_target_accuracy", "mean_tokens")}
    for name, scorer in sources.items():
        pipe.adapter.text_scorer = scorer
        report["sources"][name] = {"localisation": localisation(pipe, samples), **accuracies(pipe, samples)}
        print(name, json.dumps(report["sources"][name]), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    small = next(iter(report["sources"].values()))["localisation"]["n_small"]
    print(f"\n{report['limit']} test questions ({small} small-target); accuracy at budget {report['budget']}\n")
    print("| text source | hit top-10% | hit top-1 | top-1 colour / shape / exists | recoverable acc (small) | fastervlm+text acc (small) |")
    print("|---|---|---|---|---|---|")
    for name, row in report["sources"].items():
        loc = row["localisation"]
        per_type = " / ".join(f"{loc['top1_' + q]:.1f}" for q in SMALL_QTYPES)
        accs = [f"{row[m]['accuracy']:.1f} ({row[m]['small_target_accuracy']:.1f})" for m in TEXT_METHODS]
        print(f"| {name} | {loc['top10']:.1f} | {loc['top1']:.1f} | {per_type} | {accs[0]} | {accs[1]} |")
    for label, ref in report["references"].items():
        print(f"| reference {label} | | | | {ref['accuracy']:.1f} ({ref['small_target_accuracy']:.1f}), {ref['mean_tokens']} tokens | |")


if __name__ == "__main__":
    main()
