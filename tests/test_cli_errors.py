"""The CLI's error boundary (every command: exit status 2, a clear message, no traceback) and its
tables at 80 columns, in-process with typer's CliRunner."""

import functools
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from vtc import cli
from vtc.cli import app
from vtc.methods import VTCError

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs"


def fails_cleanly(result, message: str) -> None:
    """Exit status 2, the message on the terminal, and no exception escaped the command."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # anything else would be a traceback
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- report


def test_report_on_a_directory_without_results(tmp_path):
    fails_cleanly(runner.invoke(app, ["report", str(tmp_path / "nowhere")]), "no bench results under")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.0.jsonl").write_text('{"torn": ')
    fails_cleanly(runner.invoke(app, ["report", str(tmp_path / "empty")]), "no bench results under")


# ----------------------------------------------------------------------------- speed


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--budgets", "abc"], "budget"),
        (["--budgets", "0"], "at least 1"),
        (["--llm-layers", "0"], "--llm-layers must be between 1 and 32"),
        (["--llm-layers", "33"], "--llm-layers must be between 1 and 32"),
        (["--text-tokens", "1"], "--text-tokens must be at least 2"),
        (["--select-batches", "0"], "--select-batches '0': expected comma-separated batch sizes of at least 1"),
        (["--select-batches", "1,x"], "--select-batches '1,x'"),
        (["--select-batches", ","], "--select-batches"),
    ],
)
def test_speed_bad_options(args, message, tmp_path):
    fails_cleanly(runner.invoke(app, ["speed", "--methods", "pool", "--out", str(tmp_path / "o")] + args), message)


def test_speed_out_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    fails_cleanly(runner.invoke(app, ["speed", "--methods", "pool", "--out", str(tmp_path / "file")]), "exists and is not a directory")


def test_speed_error_in_the_middle_of_the_run(tiny_dirs, tmp_path, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    from vtc import speed
    from vtc.models.clip_text import ClipTextScorer

    tiny = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0]).eval()  # 2 decoder layers
    scorer = ClipTextScorer.from_pretrained(tiny_dirs[1])
    real = speed.SpeedBench
    monkeypatch.setattr(speed, "SpeedBench", lambda layers, text, decode, **kw: real(layers, text, decode, model=tiny, text_scorer=scorer, **kw))
    result = runner.invoke(app, ["speed", "--methods", "pyramiddrop", "--budgets", "8", "--llm-layers", "2", "--reps", "1",
                                 "--text-tokens", "6", "--decode-tokens", "1", "--out", str(tmp_path / "o")])
    fails_cleanly(result, "build at least 4 decoder layers")


# ----------------------------------------------------------------------------- demo


def test_demo_without_a_checkpoint_and_with_a_bad_out(tmp_path, monkeypatch):
    import vtc.demo.run as demo

    monkeypatch.setattr(demo, "run_demo", functools.partial(demo.run_demo, checkpoint=tmp_path / "no-checkpoint"))
    fails_cleanly(runner.invoke(app, ["demo", "--limit", "2", "--out", str(tmp_path / "o")]), "no demo checkpoint at")
    (tmp_path / "file").write_text("x")
    fails_cleanly(runner.invoke(app, ["demo", "--out", str(tmp_path / "file")]), "exists and is not a directory")


# ----------------------------------------------------------------------------- bench


def _bench(tiny_dirs, out, *extra):
    return ["bench", "--model", str(tiny_dirs[0]), "--clip", str(tiny_dirs[1]), "--tasks", "synthetic", "--methods", "none,pool",
            "--budgets", "4", "--limit", "2", "--out", str(out), *extra]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tasks", "vqa3"], "unknown task 'vqa3'"),
        (["--tasks", "gqa=/nonexistent"], "does not exist"),
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--budgets", "999"], "more than"),
        (["--model", "/nonexistent"], "is not a directory"),
        (["--dtype", "int4"], "dtype 'int4'"),
    ],
)
def test_bench_bad_options(tiny_dirs, tmp_path, extra, message):
    fails_cleanly(runner.invoke(app, _bench(tiny_dirs, tmp_path / "o", *extra)), message)


def test_bench_error_in_the_report_step_at_the_end(tiny_dirs, tmp_path, monkeypatch):
    import vtc.bench.report as report

    def broken(directory):
        raise VTCError(f"no bench results under {directory} (simulated)")

    monkeypatch.setattr(report, "write_report", broken)
    result = runner.invoke(app, _bench(tiny_dirs, tmp_path / "o"))
    fails_cleanly(result, "(simulated)")
    assert "4 new results" in result.output  # the run itself finished and was stored


def test_bench_on_a_task_without_samples(tiny_dirs, tmp_path):
    data = tmp_path / "sqa"
    data.mkdir()  # ScienceQA with no image question: the IMG subset is empty
    (data / "problems.json").write_text(json.dumps({"8": {"question": "q", "choices": ["a", "b"], "answer": 0, "image": None, "split": "test"}}))
    (data / "pid_splits.json").write_text(json.dumps({"test": ["8"]}))
    result = runner.invoke(app, _bench(tiny_dirs, tmp_path / "o", "--tasks", f"scienceqa_img={data}"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit) and "error:" in result.output, result.output


def test_bench_out_path_that_is_a_file(tiny_dirs, tmp_path):
    (tmp_path / "file").write_text("x")
    fails_cleanly(runner.invoke(app, _bench(tiny_dirs, tmp_path / "file")), "exists and is not a directory")


def test_error_messages_are_printed_as_text_not_markup(tmp_path):
    # a message with [brackets] (e.g. a pip extra) must come out verbatim
    result = runner.invoke(app, ["run", "--model", str(tmp_path), "--image", "x.png", "--question", "q", "--method", "[bold]x"])
    fails_cleanly(result, "unknown method '[bold]x'")


# ----------------------------------------------------------------------------- tables at 80 columns


@pytest.fixture
def narrow(monkeypatch):
    def use(width):
        out = io.StringIO()
        monkeypatch.setattr(cli, "console", Console(file=out, width=width, color_system=None, highlight=False))
        return out

    return use


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def test_speed_table_fits_80_columns_with_every_header_whole(narrow):
    results = json.loads((DOCS / "speed.json").read_text())["results"]  # a real 19-method run
    out = narrow(80)
    cli.print_speed(results, "LLaVA-1.5-7B shape, 4 decoder layers built, timings extrapolated to 32 (cpu, float32)")
    text = out.getvalue()
    assert max(map(len, _lines(text))) <= 80 and "…" not in text
    header = " ".join(text.split())
    for word in ("method", "budget", "tokens", "prefill", "speed", "up", "FLOPs", "ratio", "vs", "own", "cost", "decode", "ms/tok", "KV", "MB"):
        assert re.search(rf"(^|\s){re.escape(word)}(\s|$)", header), word
    for r in results:  # every row is on one line, with its method, budget and speed-up in full
        assert any(line.startswith(r["method"]) and f" {r['budget']} " in line and f"{r['speedup']:.2f}x" in line for line in _lines(text)), r


def test_selection_table_fits_80_columns_with_the_widest_cells(narrow):
    results = json.loads((DOCS / "speed.json").read_text())["results"]  # a real 19-method run's rows
    for r in results:  # the widest cells a real run gives: ms >= 100 per image, a share of 100% and more
        timed = r["method"] not in ("none", "downsample") and not r["stages"]
        r["select_ms_per_image"] = {"1": 123.456, "16": 99.999, "64": 100.0} if timed else {}
        r["select_share_of_gpu_prefill"] = {"1": 123.0, "16": 0.5, "64": 9.99} if timed else {}
        r.update(gpu_prefill_ms=123.45, gpu_prefill_ms_full=456.78)
    out = narrow(80)
    cli.print_selection(results, [1, 16, 64], "Selection alone, ms per image (cpu), vs estimated GPU prefill (A100 bf16, ...)")
    text = out.getvalue()
    assert max(map(len, _lines(text))) <= 80 and "…" not in text
    header = " ".join(text.split())
    for word in ("ms/img", "b=1", "b=16", "b=64", "GPU", "ms", "full", "here", "%"):
        assert re.search(rf"(^|\s){re.escape(word)}(\s|$)", header), word
    for r in results:  # one line per row: its method, budget, selection at batch 1 (or '-') and the GPU estimate
        first = "123.46" if r["select_ms_per_image"] else "-"
        assert any(line.startswith(r["method"]) and f" {r['budget']} " in line and f" {first} " in line and "123.5" in line
                   and (">9999%" in line) == bool(r["select_ms_per_image"]) for line in _lines(text)), r
    assert cli._select_cell({"select_share_of_gpu_prefill": {"1": 14.846}}, 1, share=True) == "1485%"
    assert cli._select_cell({"select_share_of_gpu_prefill": {"1": 0.01234}}, 1, share=True) == "1.2%"


def test_report_tables_fit_80_columns(narrow):
    from vtc.bench.report import summarise

    def rec(method, budget, sid, score):
        return {"task": "scienceqa_img", "method": method, "budget": budget, "sample_id": sid, "answer": "A", "meta": {},
                "error": None, "score": score, "prediction": "A", "tokens_kept": 64, "flops": 8.5e12, "prefill_ms": 123.4, "total_ms": 1234.5}

    records = [rec("none", "auto", "1", 1.0), rec("recoverable>fastv", "auto>64", "1", 0.0), rec("prumerge+", "0.111", "1", 1.0)]
    rows = summarise(records)
    out = narrow(80)
    cli.print_report(rows)
    text = out.getvalue()
    assert max(map(len, _lines(text))) <= 80 and "…" not in text
    assert any(line.startswith("recoverable>fastv") and "auto>64" in line and "0.00" in line for line in _lines(text))
    assert "scienceqa_img" in text and "rel %" in text


def test_narrow_terminal_gets_one_line_per_row_and_nothing_cut(narrow):
    results = json.loads((DOCS / "speed.json").read_text())["results"][:3]
    out = narrow(40)
    cli.print_speed(results, "title")
    flat = " ".join(out.getvalue().split())
    assert "…" not in flat
    for r in results:
        assert f"{r['method']}@{r['budget']}:" in flat and f"speed up {r['speedup']:.2f}x" in flat


def test_report_command_prints_its_tables_within_80_columns(tmp_path, narrow):
    from vtc.bench.store import ResultStore

    store = ResultStore(tmp_path, shard=0)
    for i, (method, budget, score) in enumerate([("none", "auto", 1.0), ("recoverable>fastv", "auto>64", 0.0)]):
        store.append({"task": "mmbench", "method": method, "budget": budget, "sample_id": "1", "answer": "A", "error": None,
                      "meta": {"index": 1}, "score": score, "prediction": "A", "tokens_kept": 64 - i, "flops": 8.5e12,
                      "prefill_ms": 120.0, "total_ms": 1234.5})
    store.close()
    out = narrow(80)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = out.getvalue()
    assert max(map(len, _lines(text))) <= 80 and "…" not in text
    assert any(line.startswith("recoverable>fastv") and "auto>64" in line and "0.00" in line for line in _lines(text)), text
