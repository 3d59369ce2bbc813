"""`vtc report` aggregation on hand-built records: score, relative %, n, failed, costs, a missing or NaN baseline."""

import csv
import json
import math

import pytest
from rich.console import Console

from vtc.bench.report import COLUMNS, markdown_table, summarise, write_report
from vtc.bench.store import ResultStore
from vtc.methods import VTCError


def rec(task, method, budget, sid, score=None, error=None, tokens=None, flops=None, prefill=None, total=None, **extra):
    r = {"task": task, "method": method, "budget": budget, "sample_id": sid, "answer": "a", "meta": extra.pop("meta", {}),
         "error": error}
    if error is None:
        r.update(score=score, prediction="p", tokens_kept=tokens, flops=flops, prefill_ms=prefill, total_ms=total)
    return {**r, **extra}


def vqa_records():
    return [
        # full tokens: scores 1, 0, 1 -> 66.67; 16 tokens; 2 and 4 TFLOPs -> 3; prefill 10, 20, 30 -> 20
        rec("vqav2", "none", "auto", "1", 1.0, tokens=16, flops=2e12, prefill=10.0, total=20.0),
        rec("vqav2", "none", "auto", "2", 0.0, tokens=16, flops=4e12, prefill=20.0, total=40.0),
        rec("vqav2", "none", "auto", "3", 1.0, tokens=16, flops=3e12, prefill=30.0, total=60.0),
        # random@4: one sample failed (its cost fields, if any, do not count); the two that ran: 1 and 0 -> 50.0, tokens 4 and 5 -> 4.5
        rec("vqav2", "random", "4", "1", 1.0, tokens=4, flops=1e12, prefill=5.0, total=9.0),
        rec("vqav2", "random", "4", "2", error="generation failed", tokens_kept=99, flops=9e12, prefill_ms=99.0, total_ms=99.0),
        rec("vqav2", "random", "4", "3", 0.0, tokens=5, flops=2e12, prefill=7.0, total=11.0),
        # a VQA soft score (2/3 of the humans agree) counts as it is: (1/3 + 2/3) / 2 = 50.0
        rec("vqav2", "pool", "4", "1", 1 / 3, tokens=4, flops=1e12, prefill=5.0, total=9.0),
        rec("vqav2", "pool", "4", "2", 2 / 3, tokens=4, flops=1e12, prefill=float("nan"), total=None),  # unmeasured: skipped
    ]


def test_scores_relative_counts_and_costs_by_hand():
    rows = {(r["method"], r["budget"]): r for r in summarise(vqa_records())}
    full, rand, pool = rows[("none", "auto")], rows[("random", "4")], rows[("pool", "4")]
    assert full["score"] == 66.67 and full["relative"] == 100.0
    assert (full["n"], full["failed"], full["tokens"], full["tflops"], full["prefill_ms"], full["total_ms"]) == (3, 0, 16.0, 3.0, 20.0, 40.0)
    assert rand["score"] == 50.0
    assert rand["relative"] == 75.0  # 50 / 66.67 in percent, one decimal
    assert (rand["n"], rand["failed"]) == (2, 1)  # the failed record is not a sample that ran
    assert (rand["tokens"], rand["tflops"], rand["prefill_ms"], rand["total_ms"]) == (4.5, 1.5, 6.0, 10.0)
    assert pool["score"] == 50.0 and pool["relative"] == 75.0 and (pool["prefill_ms"], pool["total_ms"]) == (5.0, 9.0)


def test_a_missing_or_nan_or_zero_baseline_gives_nan_relative():
    no_full = [r for r in vqa_records() if r["method"] != "none"]
    assert all(math.isnan(r["relative"]) for r in summarise(no_full))
    # every full-token sample failed: its score is NaN, so is every relative score (never a number, never a crash)
    failed_full = no_full + [rec("vqav2", "none", "auto", "1", error="boom"), rec("vqav2", "none", "auto", "2", error="boom")]
    rows = {r["method"]: r for r in summarise(failed_full)}
    assert math.isnan(rows["none"]["score"]) and (rows["none"]["n"], rows["none"]["failed"]) == (0, 2)
    assert math.isnan(rows["none"]["tokens"]) and math.isnan(rows["random"]["relative"])
    zero_full = no_full + [rec("vqav2", "none", "auto", "1", 0.0, tokens=16, flops=1e12, prefill=1.0, total=1.0)]
    assert all(math.isnan(r["relative"]) for r in summarise(zero_full))  # 0 full-token score: no ratio


def test_baseline_is_per_task_and_rows_are_sorted():
    records = vqa_records() + [
        rec("gqa", "none", "auto", "1", 1.0, tokens=16, flops=1e12, prefill=1.0, total=1.0),
        rec("gqa", "none", "auto", "2", 1.0, tokens=16, flops=1e12, prefill=1.0, total=1.0),
        rec("gqa", "random", "4", "1", 1.0, tokens=4, flops=1e12, prefill=1.0, total=1.0),
        rec("gqa", "random", "4", "2", 0.0, tokens=4, flops=1e12, prefill=1.0, total=1.0),
    ]
    rows = summarise(records)
    assert [(r["task"], r["method"]) for r in rows] == [("gqa", "none"), ("gqa", "random"), ("vqav2", "none"), ("vqav2", "pool"), ("vqav2", "random")]
    assert rows[1]["relative"] == 50.0 and rows[4]["relative"] == 75.0  # each against its own task's full-token score


def test_official_aggregates_reach_the_report():
    pope = [rec("pope", "none", "auto", f"random/{i}", 1.0, tokens=16, flops=1e12, prefill=1.0, total=1.0,
                meta={"split": "random"}, answer=label, prediction=pred)
            for i, (pred, label) in enumerate([("Yes", "yes"), ("No", "yes"), ("No", "no"), ("Yes", "no")])]
    [row] = summarise(pope)
    assert row["score"] == 50.0  # tp 1, fp 1, fn 1: precision 1/2, recall 1/2, F1 50 (the mean F1 over splits)
    assert row["metrics"]["splits"]["random"]["accuracy"] == 50.0


def test_write_report_files_from_a_store(tmp_path):
    store = ResultStore(tmp_path, shard=0)
    for r in vqa_records():
        store.append(r)
    store.close()
    rows = write_report(tmp_path)
    with open(tmp_path / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [c for c in table[0]] == COLUMNS and len(table) == 3
    by = {(r["method"], r["budget"]): r for r in table}
    assert by[("random", "4")]["relative"] == "75.0" and by[("random", "4")]["n"] == "2" and by[("random", "4")]["failed"] == "1"
    assert "| vqav2 | random | 4 | 50.0 | 75.0 | 4.5 |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())[0]["score"] == rows[0]["score"]
    assert markdown_table(rows[:1]) == (
        "| task | method | budget | score | relative | tokens | tflops | prefill_ms | total_ms | n | failed |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| vqav2 | none | auto | 66.67 | 100.0 | 16.0 | 3.0 | 20.0 | 40.0 | 3 | 0 |\n"
    )
    assert markdown_table(rows).count("\n") == 2 + len(rows)
    assert markdown_table(rows).splitlines()[3].startswith("| vqav2 | pool | 4 | 50.0 | 75.0 |")  # one line per row
    assert (tmp_path / "report.json").read_text().startswith('[\n  {\n    "task": "vqav2"')  # indented for reading
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and "<table>" in (tmp_path / "report.html").read_text()
    with pytest.raises(VTCError, match="no bench results"):
        write_report(tmp_path / "empty")


def test_rounding_of_every_column_and_a_tiny_baseline():
    common = dict(flops=1.23456e12, prefill=1.2345, total=2.3456)
    records = [rec("vqav2", "none", "auto", str(i), s, tokens=16, **common) for i, s in enumerate([1.0, 0.0, 0.0])]
    records += [rec("vqav2", "pool", "4", str(i), s, tokens=t, **common) for i, (s, t) in enumerate([(1.0, 4), (1.0, 4), (0.0, 5)])]
    pool = {r["method"]: r for r in summarise(records)}["pool"]
    # score 66.67 vs 33.33 -> 200.02 %, shown to one decimal; tokens (4 + 4 + 5) / 3 = 4.333
    assert (pool["score"], pool["relative"], pool["tokens"]) == (66.67, 200.0, 4.3)
    assert (pool["tflops"], pool["prefill_ms"], pool["total_ms"]) == (1.2346, 1.23, 2.35)
    # a full-token score below 1 % is still a baseline: 1 of 200 right (0.5) vs 2 of 200 (1.0) -> 200 %
    tiny = [rec("gqa", "none", "auto", str(i), float(i == 0), tokens=16, **common) for i in range(200)]
    tiny += [rec("gqa", "pool", "4", str(i), float(i < 2), tokens=4, **common) for i in range(200)]
    rows = {r["method"]: r for r in summarise(tiny)}
    assert rows["none"]["score"] == 0.5 and rows["pool"]["relative"] == 200.0
