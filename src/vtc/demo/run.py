"""`vtc demo`: the shipped tiny LLaVA, several compressors at about 10% of tokens, a table and token maps."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..methods.cdpruner import CDPruner
from .evaluate import CHECKPOINT, checkpoint_families, run_method, saved_families, test_samples

# (label, method, budget): Recoverable Compression at its own dynamic budget and at the peers' fixed one.
DEMO_RUNS = [
    ("none", "none", "auto"),
    ("recoverable", "recoverable", "auto"),
    ("recoverable@10%", "recoverable", 0.1),
    ("prumerge@10%", "prumerge", 0.1),
    ("random@10%", "random", 0.1),
    ("pool@10%", "pool", 0.1),
    ("fastervlm@10%", "fastervlm", 0.1),
    ("visionzip@10%", "visionzip", 0.1),
    ("divprune@10%", "divprune", 0.1),
    ("fastervlm+text@10%", "fastervlm+text", 0.1),
    ("vispruner@10%", "vispruner", 0.1),
    ("cdpruner@10%", "cdpruner", 0.1),  # as published: the negated CLIP relevance (README, "Methods")
    ("cdp-direct@10%", CDPruner(relevance="direct"), 0.1),  # cdpruner with the relevance as the demo's CLIP points it
    # a 10% LAYER AVERAGE (the paper's unit): 15% of the tokens enter the LLM ("mean tokens"), 5% from its middle layer
    ("vscan@10%", "vscan", 0.1),
    ("holov@10%", "holov", 0.1),
    ("visiontrim@10%", "visiontrim", 0.1),
    ("flowcut@10%", "flowcut", 0.1),  # prunes inside the tower's layers
    # merges at most half the tokens in each of the 3 tower layers run: 25 of 196 (12.8%) is as low as it goes
    ("tome_tower@25", "tome_tower", 25),
]

MAP_COLUMNS = ["recoverable", "recoverable@10%", "prumerge@10%", "fastervlm@10%", "visionzip@10%", "pool@10%"]


def run_demo(limit: int = 300, out: Path = Path("vtc-demo-out"), checkpoint: Path = CHECKPOINT, console: Console | None = None,
             family: str = "basic") -> dict:
    """One table (and token maps) for one scene family; ``run_demos`` runs every family the checkpoint knows."""
    from ..pipeline import Pipeline

    console = console or Console()
    if not (checkpoint / "llava" / "config.json").is_file():
        raise FileNotFoundError(
            f"no demo checkpoint at {checkpoint}; train one with `python -m vtc.demo.train --out {checkpoint}`"
        )
    pipe = Pipeline.from_pretrained(checkpoint / "llava", clip=checkpoint / "clip")
    if family not in checkpoint_families(pipe):
        raise ValueError(f"the checkpoint at {checkpoint} was not trained on the '{family}' family "
                         f"(it knows {checkpoint_families(pipe)})")
    samples = test_samples(limit, family)
    out.mkdir(parents=True, exist_ok=True)
    scores, examples = {}, {}
    with Progress(console=console) as progress:
        for label, method, budget in DEMO_RUNS:
            task = progress.add_task(label, total=len(samples))
            # one untimed request first: first-call costs (allocations, the CLIP text tower) are not the method's
            pipe([samples[0].image], [samples[0].question], method=method, budget=budget, max_new_tokens=1)
            keep = []
            scores[label] = run_method(pipe, samples, method, budget, progress=progress, task=task, keep=keep).summary()
            examples[label] = keep

    full_prefill = scores["none"]["prefill_ms"]
    table = Table(title=f"vtc demo, {family} scenes: {len(samples)} test questions, {pipe.adapter.num_patches} image tokens each")
    for col in ("method", "mean tokens", "accuracy", "small-target acc.", "prefill vs full"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for label, s in scores.items():
        table.add_row(
            label, f"{s['mean_tokens']:.1f}", f"{s['accuracy']:.1f}%", f"{s['small_target_accuracy']:.1f}%",
            f"{s['prefill_ms'] / full_prefill:.2f}x",
        )
    console.print(table)

    picture = out / "token_maps.png"
    write_token_maps(examples, pipe.adapter.grid, picture)
    (out / "demo_results.json").write_text(json.dumps(scores, indent=2))
    console.print(f"token maps: {picture}   results: {out / 'demo_results.json'}")
    return scores


def write_token_maps(examples: dict, grid, path: Path, count: int = 4) -> None:
    """Token maps of the first few small-target questions, one column per compressed method."""
    from ..viz import token_map, token_map_figure

    labels = [label for label in MAP_COLUMNS if label in examples] or [label for label in examples if label != "none"]
    first = examples[labels[0]]
    picks = [i for i, (s, _) in enumerate(first) if s.small_target][:count]
    rows = []
    for i in picks:
        sample = first[i][0]
        maps = []
        for label in labels:
            _, result = examples[label][i]
            maps.append((f"{label}: '{result.text}' ({result.tokens_after} tok)", token_map(sample.image, result.selection, grid)))
        rows.append((f"Q: {sample.question}  A: {sample.answer}", sample.image, maps))
    token_map_figure(rows, path)


def run_demos(limit: int = 300, out: Path = Path("vtc-demo-out"), checkpoint: Path | None = None, console: Console | None = None) -> dict:
    """``run_demo`` for every family the checkpoint was trained on: basic into ``out``, the others into out/FAMILY."""
    families = saved_families(checkpoint or CHECKPOINT)
    where = {} if checkpoint is None else {"checkpoint": checkpoint}  # run_demo's own default otherwise
    return {f: run_demo(limit=limit, out=out if f == "basic" else out / f, console=console, family=f, **where) for f in families}
