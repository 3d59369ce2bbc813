"""`vtc report DIR`: a table (markdown + CSV), Pareto plots (PNG) and one HTML page from a bench store."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import defaultdict
from pathlib import Path

from ..methods.base import VTCError
from .store import read_records
from .tasks import AGGREGATES

COLUMNS = ["task", "method", "budget", "score", "relative", "tokens", "tflops", "prefill_ms", "total_ms", "n", "failed"]


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def summarise(records: list[dict]) -> list[dict]:
    """One row per (task, method, budget): the task's official score, relative to full tokens, and costs."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r["method"], r["budget"])].append(r)
    rows = []
    for (task, method, budget), recs in sorted(groups.items()):
        metrics = AGGREGATES[task](recs)
        ok = [r for r in recs if r.get("error") is None]
        rows.append(
            {
                "task": task, "method": method, "budget": budget, "score": metrics["score"],
                "tokens": round(_mean(r["tokens_kept"] for r in ok), 1),
                "tflops": round(_mean(r["flops"] for r in ok) / 1e12, 4),
                "prefill_ms": round(_mean(r["prefill_ms"] for r in ok), 2),
                "total_ms": round(_mean(r["total_ms"] for r in ok), 2),
                "n": len(ok), "failed": len(recs) - len(ok), "metrics": metrics,
            }
        )
    full = {r["task"]: r["score"] for r in rows if r["method"] == "none"}
    for r in rows:
        base = full.get(r["task"])
        r["relative"] = round(100 * r["score"] / base, 1) if base and not math.isnan(base) and base > 0 else float("nan")
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def pareto_plot(rows: list[dict], path: Path) -> None:
    """Per task: score vs tokens and score vs latency, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    for t, task in enumerate(tasks):
        mine = [r for r in rows if r["task"] == task]
        methods = sorted({r["method"] for r in mine})
        for ax, x_key, label in ((axes[t][0], "tokens", "image tokens sent to the LLM"), (axes[t][1], "total_ms", "latency per sample (ms)")):
            for m in methods:
                pts = sorted((r[x_key], r["score"]) for r in mine if r["method"] == m)
                style = "k*" if m == "none" else "o-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m, markersize=9 if m == "none" else 5)
            ax.set_xlabel(label)
            ax.set_ylabel(f"{task} score")
            ax.grid(alpha=0.3)
        axes[t][0].legend(fontsize=7, ncol=2)
        axes[t][0].set_title(f"{task}: accuracy vs tokens")
        axes[t][1].set_title(f"{task}: accuracy vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _img_tag(path: Path, width: int) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}" alt="{html.escape(path.stem)}">'


def write_html(rows: list[dict], directory: Path, path: Path) -> None:
    table = "<table><tr>" + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>"
    for r in rows:
        table += "<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in COLUMNS) + "</tr>"
    table += "</table>"
    maps = sorted((directory / "maps").glob("*.png"))
    gallery = "".join(
        f'<figure>{_img_tag(m, 180)}<figcaption>{html.escape(m.stem.replace("__", " "))}</figcaption></figure>' for m in maps[:24]
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vtc report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
figure{{display:inline-block;margin:6px;text-align:center;font-size:11px}}</style></head><body>
<h1>vtc bench report</h1><p>{len(rows)} method/budget/task rows from {html.escape(str(directory))}. Score: each task's official metric;
relative: % of the full-token (none) score; tflops: analytical prefill FLOPs (vision + projector + LLM).</p>
{table}<h2>Pareto</h2>{_img_tag(directory / "pareto.png", 900)}<h2>Token maps</h2>
<p>green kept, magenta recovered by text, blue merged, dark dropped.</p>{gallery}</body></html>"""
    path.write_text(page)


def write_report(directory: Path) -> list[dict]:
    directory = Path(directory)
    records = read_records(directory)
    if not records:
        raise VTCError(f"no bench results under {directory} (expected results.*.jsonl from `vtc bench`)")
    rows = summarise(records)
    (directory / "report.md").write_text(markdown_table(rows))
    with open(directory / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (directory / "report.json").write_text(json.dumps(rows, indent=2, default=str))
    pareto_plot(rows, directory / "pareto.png")
    write_html(rows, directory, directory / "report.html")
    return rows
