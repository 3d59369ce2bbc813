"""The ``vtc`` command: list methods, compress + answer one question, run the demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .methods import Budget, VTCError, available, get

app = typer.Typer(help="vtc: training-free visual token compression for vision-language models.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the compression methods, the signals each reads, and their papers."""
    rows = []
    for name in available():
        method = get(name)
        att = method.attention
        needs = sorted(method.needs)
        where = f"layer {att.layer}, heads={att.heads}" if {"cls_attn", "keys", "received_attn"} & set(needs) else ""
        if getattr(method, "in_llm", False):
            where = "decoder layers: " + getattr(method, "budget_meaning", "")
        if "keys" in needs:
            where += f", keys={att.keys}"
        rows.append(
            {
                "name": name,
                "needs": needs,
                "attention": where,
                "acts": "inside the LLM" if getattr(method, "in_llm", False) else "before the LLM",
                "auto": method.supports_auto,
                "paper": method.paper,
                "code": method.code,
                "token_pairs": method.pairwise,
                "summary": method.describe(),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="vtc methods")
    for col in ("method", "signals", "from", "auto", "N x N", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"], ", ".join(r["needs"]), r["attention"], "yes" if r["auto"] else "", "yes" if r["token_pairs"] else "", r["paper"]
        )
    console.print(table)
    console.print("N x N: the method builds token-token distances by design. Code links: `vtc methods --json`.")
    console.print("Chain a vision-side and an in-LLM method with '>': --method 'recoverable>fastv' --budget 'auto>64'.")
    console.print("Any pruning method + text recovery: append '+text' (e.g. random+text).")


@app.command("run")
def run_cmd(
    model: Path = typer.Option(..., "--model", help="Directory of a saved LLaVA-1.5 checkpoint (with its processor)."),
    image: Path = typer.Option(..., "--image", help="Image file."),
    question: str = typer.Option(..., "--question", help="The question about the image."),
    method: str = typer.Option("recoverable", "--method", help="Compression method (see `vtc methods`)."),
    budget: str = typer.Option("auto", "--budget", help="Tokens to keep: a count (64), a ratio (0.111) or 'auto'; chains: 'auto>64'."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP checkpoint with the text tower (text-guided methods)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Compress one image's tokens with METHOD at BUDGET and answer QUESTION."""
    from .pipeline import Pipeline, resolve

    try:
        resolve(method, budget, {})  # fail on an unknown name, chain or budget before loading anything
        pipe = Pipeline.from_pretrained(model, clip=clip)
        [result] = pipe([image], [question], method=method, budget=budget, max_new_tokens=max_new_tokens)
    except VTCError as exc:
        _fail(str(exc))
    record = result.to_dict()
    if as_json:
        print(json.dumps(record))
        return
    console.print(f"[bold]{result.text}[/]")
    console.print(
        f"method={record['method']} budget={record['budget']} tokens {record['tokens_before']} -> "
        f"{record['tokens_after']} {record['provenance']}  prefill {record['prefill_ms']:.1f} ms"
    )


@app.command("demo")
def demo_cmd(
    limit: int = typer.Option(300, "--limit", min=1, help="Number of synthetic test questions."),
    out: Path = typer.Option(Path("vtc-demo-out"), "--out", help="Where the token-map PNG and JSON go."),
) -> None:
    """Run the shipped tiny LLaVA on the synthetic benchmark with several compressors at about 10% of tokens."""
    from .demo.run import run_demo

    try:
        run_demo(limit=limit, out=out, console=console)
    except (VTCError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command("bench")
def bench_cmd(
    model: Path = typer.Option(None, "--model", help="LLaVA-1.5 checkpoint directory (default: the shipped demo model)."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP checkpoint with the text tower (default: the demo's, with the demo model)."),
    tasks: str = typer.Option("synthetic", "--tasks", help="Comma-separated tasks: synthetic, or NAME=DATA_DIR (vqav2, gqa, textvqa, pope, mme, scienceqa_img, mmbench)."),
    methods: str = typer.Option("none,recoverable,prumerge,fastervlm,visionzip,random,pool", "--methods", help="Comma-separated methods."),
    budgets: str = typer.Option("20,40,auto", "--budgets", help="Comma-separated budgets: counts, ratios or auto."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N samples of each task."),
    out: Path = typer.Option(Path("vtc-bench-out"), "--out", help="Result store directory (resumes when it exists)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
) -> None:
    """Evaluate methods x budgets x tasks; every sample is stored durably, a re-run resumes. Data-parallel under `accelerate launch`."""
    from rich.progress import Progress

    from .bench.runner import BenchRunner, make_plan, process_info
    from .demo.evaluate import CHECKPOINT
    from .pipeline import Pipeline

    rank, world, state = process_info()
    if model is None:
        model, clip = CHECKPOINT / "llava", clip or CHECKPOINT / "clip"
    try:
        pipe = Pipeline.from_pretrained(model, clip=clip)
        plan = make_plan(pipe, [t for t in tasks.split(",") if t.strip()], [m.strip() for m in methods.split(",") if m.strip()],
                         [b.strip() for b in budgets.split(",") if b.strip()], limit)
    except (VTCError, FileNotFoundError) as exc:
        _fail(str(exc))
    for note in plan.skipped:
        console.print(f"[yellow]skipped[/] {note}")
    runner = BenchRunner(pipe, out, batch_size, rank, world)
    with Progress(console=console, disable=rank != 0) as progress:
        written = runner.run(plan, progress)
    state.wait_for_everyone()
    console.print(f"process {rank}/{world}: {written} new results in {out}")
    if rank == 0:
        from .bench.report import write_report

        rows = write_report(out)
        table = Table(title="vtc bench")
        for col in ("task", "method", "budget", "score", "relative", "tokens", "tflops", "total_ms"):
            table.add_column(col)
        for r in rows:
            table.add_row(*(str(r[c]) for c in ("task", "method", "budget", "score", "relative", "tokens", "tflops", "total_ms")))
        console.print(table)
        console.print(f"report: {out / 'report.md'}, {out / 'pareto.png'}, {out / 'report.html'}")


@app.command("report")
def report_cmd(directory: Path = typer.Argument(..., help="A `vtc bench --out` directory.")) -> None:
    """Write report.md / report.csv / pareto.png / report.html from a bench result store."""
    from .bench.report import write_report

    try:
        rows = write_report(directory)
    except VTCError as exc:
        _fail(str(exc))
    console.print(f"{len(rows)} rows -> {directory / 'report.md'}, {directory / 'pareto.png'}, {directory / 'report.html'}")


ZOO = ("fastervlm,visionzip,divprune,fopru-rank,fopru-row,tome,evit,todre,downsample,pool,random,prumerge,prumerge+,recoverable,"
       "fastv,pyramiddrop,sparsevlm,feather,dart")


@app.command("speed")
def speed_cmd(
    methods: str = typer.Option(ZOO, "--methods", help="Comma-separated methods to time against full tokens."),
    budgets: str = typer.Option("64,128,192,auto", "--budgets", help="Comma-separated budgets ('auto' only for methods that have one)."),
    llm_layers: int = typer.Option(4, "--llm-layers", help="Decoder layers to build (Llama-7B has 32; figures are extrapolated to 32; in-LLM methods need stages + 1)."),
    reps: int = typer.Option(3, "--reps", min=1, help="Interleaved repetitions; medians are reported."),
    text_tokens: int = typer.Option(64, "--text-tokens", help="Text positions in the prompt besides the image."),
    decode_tokens: int = typer.Option(8, "--decode-tokens", min=1, help="Tokens decoded to time the per-token cost."),
    out: Path = typer.Option(Path("vtc-speed-out"), "--out", help="Where speed.json and speed.png go."),
) -> None:
    """Time every method on the real LLaVA-1.5-7B shape (random weights): prefill speed-up vs the FLOPs ratio."""
    from rich.progress import Progress

    from .speed import FULL_DEPTH, run_speed, write_outputs

    names = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        for name in names:
            get(name)
        budget_list = [str(Budget.parse(b.strip())) for b in budgets.split(",") if b.strip()]
        with Progress(console=console) as progress:
            bench, results = run_speed(names, budget_list, llm_layers, reps, text_tokens, decode_tokens, progress)
    except VTCError as exc:
        _fail(str(exc))
    for note in bench.skipped:
        console.print(f"[yellow]skipped[/] {note}")
    meta = {"skipped": bench.skipped, "llm_layers_built": llm_layers, "extrapolated_to_layers": FULL_DEPTH, "reps": reps, "text_tokens": text_tokens,
            "device": str(bench.device), "dtype": str(bench.dtype).replace("torch.", "")}
    write_outputs(results, meta, out)
    table = Table(title=f"LLaVA-1.5-7B shape, {llm_layers} decoder layers built, prefill extrapolated to {FULL_DEPTH} ({meta['device']}, {meta['dtype']})")
    for col in ("method", "budget", "tokens", "e2e prefill ms", "speed-up", "FLOPs ratio", "speed-up / FLOPs", "own overhead", "decode ms/tok", "KV MB (fp16)"):
        table.add_column(col, justify="right" if col not in ("method", "budget") else "left")
    for r in results:
        table.add_row(
            r["method"], r["budget"], f"{r['tokens']:.0f}", f"{r['e2e_prefill_ms_32_layers']:.0f}", f"{r['speedup']:.2f}x",
            f"{r['flops_ratio']:.2f}x", f"{r['speedup_vs_flops']:.2f}", f"{100 * r['overhead_share_of_full_prefill']:.2f}%",
            f"{r['decode_ms_per_token_32_layers']:.0f}", f"{r['kv_bytes_32_layers_fp16'] / 1e6:.0f}",
        )
    console.print(table)
    console.print(f"wrote {out / 'speed.json'} and {out / 'speed.png'}")


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except VTCError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
