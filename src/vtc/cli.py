"""The ``vtc`` command: list methods, compress + answer one question, run the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .methods import Budget, VTCError, available, get

console = Console()
err_console = Console(stderr=True)
EXIT_ERROR = 2
TEXT_SOURCE_HELP = "Text score of text-guided methods: clip (the --clip checkpoint's text tower) or llm (the model's own input embeddings; no --clip)."
DTYPE_HELP = "Weights' dtype: auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16."


class _ErrorBoundary(TyperGroup):
    """Runs every command inside one error boundary: a VTCError (or a missing file) raised anywhere in a
    command, its last step included, prints its message and exits with status 2, never a traceback."""

    def invoke(self, ctx):
        from .env import check_torchvision

        try:
            check_torchvision()  # a torchvision that cannot load would otherwise fail inside transformers
            return super().invoke(ctx)
        except (VTCError, FileNotFoundError) as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(EXIT_ERROR) from None


app = typer.Typer(help="vtc: training-free visual token compression for vision-language models.", no_args_is_help=True, cls=_ErrorBoundary)


def _check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse an output path that cannot be a directory before any model loads (not after a long run)."""
    if out.exists() and not out.is_dir():
        raise VTCError(f"{flag} {out} exists and is not a directory")


def _support_text(served: bool, how: str) -> str:
    return how if served else f"no ({how})"


def _support_mark(how: str) -> str:
    """Short form for the table: ✓ served, ✓tile ranked per tile only, ✗ refused."""
    return "✗" if how.startswith("no ") else ("✓tile" if how == "per tile" else "✓")


def _acts(method) -> str:
    if getattr(method, "in_llm", False):
        return "inside the LLM"
    if getattr(method, "in_tower", False):
        return "inside the vision tower"
    return "before and inside the LLM" if getattr(method, "llm_stage", None) is not None else "before the LLM"


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the compression methods, the signals each reads, the model families that serve them, and their papers."""
    from .models.family import families

    rows = []
    for name in available():
        method = get(name)
        att = method.attention
        needs = sorted(method.needs)
        where = f"layer {att.layer}, heads={att.heads}" if {"cls_attn", "keys", "received_attn"} & set(needs) else ""
        if getattr(method, "in_llm", False):
            where = "decoder layers: " + getattr(method, "budget_meaning", "")
        if "cls_attn_shallow" in needs:
            where += f", shallow share {att.shallow}"
        if getattr(method, "llm_stage", None) is not None:
            where += "; decoder layers: " + getattr(method, "budget_meaning", "")
        if getattr(method, "in_tower", False):
            where = "vision layers: " + getattr(method, "tower_note", "")
        if "keys" in needs:
            where += f", keys={att.keys}"
        rows.append(
            {
                "name": name,
                "needs": needs,
                "attention": where,
                "acts": _acts(method),
                "auto": method.supports_auto,
                "paper": method.paper,
                "code": method.code,
                "token_pairs": method.pairwise,
                "summary": method.describe(),
                "families": {f.name: _support_text(*f.support(method)) for f in families()},
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="vtc methods")
    for col in ("method", "signals", "from", "auto", "N x N", "families", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        served = " ".join(f"{f}{_support_mark(how)}" for f, how in r["families"].items())
        table.add_row(
            r["name"], ", ".join(r["needs"]), r["attention"], "yes" if r["auto"] else "", "yes" if r["token_pairs"] else "",
            served, r["paper"],
        )
    console.print(table)
    console.print("N x N: the method builds token-token distances by design. Code links: `vtc methods --json`.")
    console.print("families: ✓ served (tiled images ranked globally, or per tile with --per-tile), ✓tile always per tile, "
                  "✗ refused (the reason: `vtc methods --json`).")
    console.print("Chain a vision-side and an in-LLM method with '>': --method 'recoverable>fastv' --budget 'auto>64'.")
    console.print("Any pruning method + text recovery: append '+text' (e.g. random+text).")


@app.command("run")
def run_cmd(
    model: Path = typer.Option(..., "--model", help="Directory of a saved checkpoint with its processor (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."),
    image: Path = typer.Option(..., "--image", help="Image file."),
    question: str = typer.Option(..., "--question", help="The question about the image."),
    method: str = typer.Option("recoverable", "--method", help="Compression method (see `vtc methods`)."),
    budget: str = typer.Option("auto", "--budget", help="Tokens to keep: a count (64), a ratio (0.111) or 'auto'; chains: 'auto>64'."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP checkpoint with the text tower (text-guided methods)."),
    text_source: str = typer.Option("clip", "--text-source", help=TEXT_SOURCE_HELP),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    per_tile: bool = typer.Option(False, "--per-tile", help="Tiled models (LLaVA-NeXT): split the budget across the base image and the tiles."),
) -> None:
    """Compress one image's tokens with METHOD at BUDGET and answer QUESTION."""
    from .pipeline import Pipeline, resolve

    resolve(method, budget, {})  # fail on an unknown name, chain or budget before loading anything
    pipe = Pipeline.from_pretrained(model, clip=clip, dtype=dtype, text_source=text_source)
    [result] = pipe([image], [question], method=method, budget=budget, max_new_tokens=max_new_tokens, per_tile=per_tile)
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
    """Run the shipped tiny LLaVA on the synthetic benchmark with several compressors at about 10% of tokens (one table per scene family it was trained on)."""
    from .demo.run import run_demos

    _check_out_dir(out)
    run_demos(limit=limit, out=out, console=console)


@app.command("bench")
def bench_cmd(
    model: Path = typer.Option(None, "--model", help="LLaVA-1.5 checkpoint directory (default: the shipped demo model)."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP checkpoint with the text tower (default: the demo's, with the demo model)."),
    text_source: str = typer.Option("clip", "--text-source", help=TEXT_SOURCE_HELP),
    tasks: str = typer.Option("synthetic", "--tasks", help="Comma-separated tasks: synthetic, or NAME=DATA_DIR (vqav2, gqa, textvqa, pope, mme, scienceqa_img, mmbench)."),
    methods: str = typer.Option("none,recoverable,prumerge,fastervlm,visionzip,random,pool", "--methods", help="Comma-separated methods."),
    budgets: str = typer.Option("20,40,auto", "--budgets", help="Comma-separated budgets: counts, ratios or auto."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N samples of each task."),
    out: Path = typer.Option(Path("vtc-bench-out"), "--out", help="Result store directory (resumes when it exists)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Evaluate methods x budgets x tasks; every sample is stored durably, a re-run resumes. Data-parallel under `accelerate launch`."""
    from rich.progress import Progress

    from .bench.runner import BenchRunner, load_tasks, make_plan, process_info
    from .demo.evaluate import CHECKPOINT
    from .pipeline import Pipeline

    rank, world, state = process_info()
    if model is None:
        model, clip = CHECKPOINT / "llava", clip or (CHECKPOINT / "clip" if text_source == "clip" else None)
    _check_out_dir(out)
    task_specs = [t for t in tasks.split(",") if t.strip()]
    loaded = load_tasks(task_specs, limit)  # bad or empty data fails here, before the model loads
    pipe = Pipeline.from_pretrained(model, clip=clip, dtype=dtype, text_source=text_source)
    plan = make_plan(pipe, task_specs, [m.strip() for m in methods.split(",") if m.strip()],
                     [b.strip() for b in budgets.split(",") if b.strip()], limit, tasks=loaded)
    for note in plan.skipped:
        console.print(f"[yellow]skipped[/] {escape(note)}")
    runner = BenchRunner(pipe, out, batch_size, rank, world)
    with Progress(console=console, disable=rank != 0) as progress:
        written = runner.run(plan, progress)
    state.wait_for_everyone()
    console.print(f"process {rank}/{world}: {written} new results in {out}")
    if rank == 0:
        from .bench.report import write_report

        print_report(write_report(out))
        console.print(f"report: {out / 'report.md'}, {out / 'pareto.png'}, {out / 'report.html'}")


@app.command("lmms-task")
def lmms_task_cmd(
    out: Path = typer.Argument(Path("vtc-lmms-task"), help="Directory for the task's YAML, questions and images."),
    limit: int = typer.Option(500, "--limit", min=1, help="First N questions of the synthetic benchmark (as `vtc bench --limit N`)."),
) -> None:
    """Write the synthetic benchmark as an lmms-eval task that reads only local files (for `--include_path`)."""
    from .bench.lmms_task import TASK_NAME, write_task

    _check_out_dir(out, "OUT")
    config = write_task(out, limit)
    console.print(f"wrote {config} ({limit} questions)")
    console.print(f"run: python -m lmms_eval --model vtc --model_args method=recoverable,budget=auto --tasks {TASK_NAME} "
                  f"--include_path {config.parent} --batch_size 8", markup=False, soft_wrap=True)


@app.command("report")
def report_cmd(directory: Path = typer.Argument(..., help="A `vtc bench --out` directory.")) -> None:
    """Write report.md / report.csv / pareto.png / report.html from a bench result store."""
    from .bench.report import write_report

    rows = write_report(directory)
    print_report(rows)
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
    select_batches: str = typer.Option("1,16,64", "--select-batches", help="Batch sizes to time each method's selection alone at (ms per image)."),
    shape: str = typer.Option("llava-1.5-7b", "--shape", help="Model shape: llava-1.5-7b, llava-next-7b (a 672x672 image: base + 4 tiles), llava-onevision-7b (the same image: base + 4 tiles of 384 px, Qwen2-7B) or qwen2.5-vl-7b (a 1024x1024 image at native resolution: 1369 merged tokens, Qwen2-7B)."),
    cost_only: bool = typer.Option(False, "--cost-only", help="No model: FLOPs, KV cache, estimated GPU prefill and each method's selection alone (seconds, not minutes)."),
) -> None:
    """Time every method on a real 7B model shape (random weights): prefill speed-up vs the FLOPs ratio,
    and each method's own selection time per image next to the prefill's estimated A100 time."""
    from rich.progress import Progress

    from .cost import GPU_ASSUMPTION
    from .speed import SHAPES, check_shape, flops_curve, run_speed, write_outputs

    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        get(name)
    budget_list = [str(Budget.parse(b.strip())) for b in budgets.split(",") if b.strip()]
    batches = _batch_sizes(select_batches)
    check_shape(shape)
    _check_out_dir(out)
    if cost_only:
        _speed_cost_only(names, budget_list, shape, reps, text_tokens, batches, out)
        return
    with Progress(console=console) as progress:
        bench, results = run_speed(names, budget_list, llm_layers, reps, text_tokens, decode_tokens, progress, select_batches=batches, shape=shape)
    for note in bench.skipped:
        console.print(f"[yellow]skipped[/] {escape(note)}")
    meta = {"shape": shape, "image_tokens": bench.image_tokens, "candidates": bench.shape.num_candidates,
            "skipped": bench.skipped, "llm_layers_built": llm_layers, "extrapolated_to_layers": bench.depth, "reps": reps, "text_tokens": text_tokens,
            "device": str(bench.device), "dtype": str(bench.dtype).replace("torch.", ""), "select_batches": batches,
            "gpu_estimate": GPU_ASSUMPTION, "flops_curve": flops_curve(bench.shape, text_tokens)}
    write_outputs(results, meta, out)
    sizes = bench.inputs.get("image_sizes")
    image = "" if sizes is None else f", a {int(sizes[0][1])}x{int(sizes[0][0])} image: {bench.image_tokens} image tokens"
    if bench.picture is not None:  # native resolution: the picture before the processor's resize, and its grid
        (h, w), (rows, cols) = bench.picture, bench.shape.grid
        image = f", a {w}x{h} image: {rows}x{cols} = {bench.image_tokens} merged tokens"
    print_speed(results, f"{SHAPES[shape]} shape{image}, {llm_layers} decoder layers built, timings extrapolated to {bench.depth} "
                         f"({meta['device']}, {meta['dtype']})")
    print_selection(results, batches, f"Selection alone, ms per image ({meta['device']}), vs estimated GPU prefill ({GPU_ASSUMPTION})")
    console.print(f"wrote {out / 'speed.json'} and {out / 'speed.png'}")


def _speed_cost_only(names: list[str], budgets: list[str], shape: str, reps: int, text_tokens: int, batches: list[int], out: Path) -> None:
    """No model built: FLOPs, KV cache and GPU estimate per row, and the selection alone, for the shape's picture."""
    import json

    from .cost import GPU_ASSUMPTION
    from .speed import SHAPES, cost_rows, default_image, model_cost_shape, shape_family

    model_shape, image = model_cost_shape(shape), default_image(shape)
    with console.status("timing each method's selection alone"):
        results, skipped = cost_rows(names, budgets, model_shape, text_tokens, batches, max(5, reps), family=shape_family(shape))
    for note in skipped:
        console.print(f"[yellow]skipped[/] {escape(note)}")
    meta = {"shape": shape, "cost_only": True, "image": None if image is None else list(image),
            "image_tokens": model_shape.image_tokens, "candidates": model_shape.num_candidates, "llm_layers": model_shape.llm_layers,
            "text_tokens": text_tokens, "skipped": skipped, "select_batches": batches, "gpu_estimate": GPU_ASSUMPTION}
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    picture = "" if image is None else f", a {image[1]}x{image[0]} image"
    layout = "" if not model_shape.newlines else f" ({model_shape.num_candidates} candidates, {model_shape.newlines} newlines)"
    _print_rows(results, COST_COLUMNS, f"{SHAPES[shape]} shape{picture}: {model_shape.image_tokens} image tokens{layout}, "
                f"{model_shape.llm_layers} LLM layers (no model built: FLOPs and estimates)", COST_LEGEND)
    print_selection(results, batches, f"Selection alone, ms per image (cpu), vs estimated GPU prefill ({GPU_ASSUMPTION})")
    console.print(f"wrote {out / 'speed.json'}")


def _batch_sizes(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]: positive whole numbers, in the order given, each once."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise VTCError(f"--select-batches {text!r}: expected comma-separated batch sizes of at least 1, e.g. 1,16,64")
    return list(dict.fromkeys(int(p) for p in parts))


# ----------------------------------------------------------------------------- tables that fit 80 columns

SPEED_COLUMNS = [  # (header, cell) per column; two-line headers keep the table within 80 columns
    ("method", lambda r: r["method"]),
    ("budget", lambda r: r["budget"]),
    ("tokens", lambda r: f"{r['tokens']:.0f}"),
    ("prefill\nms", lambda r: f"{r['e2e_prefill_ms_32_layers']:.0f}"),
    ("speed\nup", lambda r: f"{r['speedup']:.2f}x"),
    ("FLOPs\nratio", lambda r: f"{r['flops_ratio']:.2f}x"),
    ("vs\nFLOPs", lambda r: f"{r['speedup_vs_flops']:.2f}"),
    ("own\ncost", lambda r: f"{100 * r['overhead_share_of_full_prefill']:.1f}%"),
    ("decode\nms/tok", lambda r: f"{r['decode_ms_per_token_32_layers']:.0f}"),
    ("KV\nMB", lambda r: f"{r['kv_bytes_32_layers_fp16'] / 1e6:.0f}"),
]
SPEED_LEGEND = (
    "prefill ms: end-to-end prefill (vision tower, selection, projector, LLM); speed-up and FLOPs ratio: vs full "
    "tokens; vs FLOPs: speed-up / FLOPs ratio; own cost: the method's time beyond the stock tower, in % of the "
    "full-token prefill (below 0 for in-tower methods, whose tower shrinks; the FLOPs ratio counts it too); decode "
    "ms per token and KV cache (MB, fp16) of the full-depth model (32 layers; Qwen2-7B 28)."
)
COST_COLUMNS = [
    ("method", lambda r: r["method"]),
    ("budget", lambda r: r["budget"]),
    ("tokens", lambda r: f"{r['tokens']:.0f}"),
    ("tower\nTFLOPs", lambda r: f"{r['vision_tflops']:.2f}"),
    ("LLM\nTFLOPs", lambda r: f"{r['llm_tflops']:.2f}"),
    ("FLOPs\nratio", lambda r: f"{r['flops_ratio']:.2f}x"),
    ("LLM\nratio", lambda r: f"{r['llm_flops_ratio']:.2f}x"),
    ("GPU ms", lambda r: f"{r['gpu_prefill_ms']:.1f}"),
    ("KV\nMB", lambda r: f"{r['kv_bytes_32_layers_fp16'] / 1e6:.0f}"),
]
COST_LEGEND = (
    "tokens: image tokens the LLM sees, newline rows included; tower TFLOPs: the vision tower (every crop; Qwen2.5-VL: "
    "window and full-attention layers); LLM TFLOPs: projector (Qwen: merger) and LLM prefill; FLOPs ratio: full tokens' "
    "total over this row's; LLM ratio: the LLM side's alone; GPU ms: the whole prefill estimated from FLOPs; KV cache in fp16."
)


def _number(value, digits: int) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


REPORT_COLUMNS = [
    ("method", lambda r: r["method"]),
    ("budget", lambda r: r["budget"]),
    ("score", lambda r: _number(r["score"], 2)),
    ("rel %", lambda r: _number(r["relative"], 1)),
    ("tokens", lambda r: _number(r["tokens"], 1)),
    ("TFLOPs", lambda r: "n/a" if r["tflops"] != r["tflops"] else f"{r['tflops']:.3g}"),
    ("ms", lambda r: _number(r["total_ms"], 0)),
    ("n", lambda r: str(r["n"])),
    ("failed", lambda r: str(r["failed"])),
]
REPORT_LEGEND = "score: the task's official metric; rel %: of the full-token (none) score; ms: latency per sample; n: samples scored."


def _print_rows(rows: list[dict], columns, title: str, legend: str = "") -> None:
    """A table if it fits the terminal, else one line per row (``header value`` pairs), so nothing is cut."""
    cells = [[cell(r) for _, cell in columns] for r in rows]
    widths = [max([len(line) for line in header.split("\n")] + [len(row[i]) for row in cells]) for i, (header, _) in enumerate(columns)]
    if sum(widths) + 2 * (len(columns) - 1) <= console.width:  # box-less table: two spaces between columns
        table = Table(title=title, title_justify="left", pad_edge=False, box=None, header_style="bold")
        for i, (header, _) in enumerate(columns):
            table.add_column(header, justify="left" if i < 2 else "right", no_wrap=True)
        for row in cells:
            table.add_row(*map(escape, row))
        console.print(table)
    else:
        console.print(title, style="bold", markup=False)
        for r in rows:
            first, rest = columns[0][1](r), columns[2:]
            pairs = ", ".join(f"{h.replace(chr(10), ' ')} {cell(r)}" for h, cell in rest)
            console.print(f"{first}@{columns[1][1](r)}: {pairs}", markup=False)
    if legend:
        console.print(legend, style="dim", markup=False)


SPLIT_COLUMNS = [
    ("method", lambda r: r["method"]),
    ("budget", lambda r: r["budget"]),
    ("tokens", lambda r: f"{r['tokens']:.0f}"),
    ("tower\nms", lambda r: f"{r['tower_side_ms']:.0f}"),
    ("LLM\nms", lambda r: f"{r['llm_side_ms']:.0f}"),
    ("tower\nshare", lambda r: f"{100 * r['tower_share']:.0f}%"),
    ("LLM\nup", lambda r: f"{r['llm_speedup']:.2f}x"),
    ("LLM\nratio", lambda r: f"{r['llm_flops_ratio']:.2f}x"),
    ("tower\nTFLOPs", lambda r: f"{r['vision_tflops']:.2f}"),
    ("LLM\nTFLOPs", lambda r: f"{r['llm_tflops']:.2f}"),
]
SPLIT_LEGEND = (
    "tower ms: our vision-tower run (with the method's signals) and its selection; LLM ms: projector (Qwen: merger) "
    "and the full-depth LLM prefill; tower share: of this row's end-to-end prefill; LLM up: the full-token row's LLM ms "
    "over this row's; LLM ratio: the same for the LLM side's FLOPs; TFLOPs of each side."
)


def print_speed(results: list[dict], title: str) -> None:
    _print_rows(results, SPEED_COLUMNS, title, SPEED_LEGEND)
    if all("tower_side_ms" in r for r in results):  # results written before the tower/LLM split have no such table
        _print_rows(results, SPLIT_COLUMNS, "Vision tower and LLM apart", SPLIT_LEGEND)


def _select_cell(r: dict, batch: int, share: bool = False) -> str:
    value = r.get("select_share_of_gpu_prefill" if share else "select_ms_per_image", {}).get(str(batch))
    if value is None:
        return "-"
    if share:  # at most 6 characters (a tiny test model's GPU estimate is ~0 ms, its share huge and meaningless)
        return f"{100 * value:.1f}%" if value < 10 else f"{100 * value:.0f}%" if value < 100 else ">9999%"
    return f"{value:.2f}"


def selection_columns(batches: list[int]):
    """Selection ms per image at each batch size, the estimated GPU prefill (full tokens and this row's),
    and the selection's share of this row's GPU prefill at the first batch size (the JSON has every size)."""
    columns = [("method", lambda r: r["method"]), ("budget", lambda r: r["budget"]), ("tokens", lambda r: f"{r['tokens']:.0f}")]
    columns += [(f"ms/img\nb={b}", lambda r, b=b: _select_cell(r, b)) for b in batches]
    columns += [("GPU ms\nfull", lambda r: f"{r['gpu_prefill_ms_full']:.1f}"), ("GPU ms\nhere", lambda r: f"{r['gpu_prefill_ms']:.1f}")]
    columns.append((f"% GPU\nb={batches[0]}", lambda r: _select_cell(r, batches[0], share=True)))
    return columns


SELECTION_LEGEND = (
    "ms/img b=B: the method's selection alone on random real-shape signals, batch of B, per image, one CPU thread ('-': none to time: "
    "in-LLM, in-tower (its work is the tower run), all tokens, downsample); GPU ms: estimated prefill (vision tower, "
    "projector, full-depth LLM) from FLOPs, full tokens and this row's; % GPU: selection per image over this row's GPU "
    "prefill (speed.json: every batch size)."
)


def print_selection(results: list[dict], batches: list[int], title: str) -> None:
    _print_rows(results, selection_columns(batches), title, SELECTION_LEGEND)


def print_report(rows: list[dict]) -> None:
    """One table per task (the task's name as its title)."""
    for task in dict.fromkeys(r["task"] for r in rows):
        _print_rows([r for r in rows if r["task"] == task], REPORT_COLUMNS, task)
    console.print(REPORT_LEGEND, style="dim", markup=False)


def main() -> None:  # pragma: no cover - console entry point (errors are handled inside the app)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
