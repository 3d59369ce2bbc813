"""Evaluation harness: official metrics on hand-worked cases, loaders on tiny official-format fixtures,
the durable store (SIGKILL + resume), data-parallel equality, bad data, and the report."""

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from vtc.bench import metrics
from vtc.bench.report import write_report
from vtc.bench.runner import BenchRunner, make_plan
from vtc.bench.store import ResultStore, read_records
from vtc.bench.tasks import load_task
from vtc.methods import VTCError

TIMING = {"prefill_ms", "decode_ms_per_token", "total_ms", "peak_bytes"}


# ----------------------------------------------------------------------------- metrics, worked by hand


def test_vqa_normalisation_follows_the_official_rules():
    assert metrics.normalize_vqa("Two dogs.") == "2 dogs"
    assert metrics.normalize_vqa("the Cat") == "cat"
    assert metrics.normalize_vqa("dont know") == "don't know"
    assert metrics.normalize_vqa("1,000") == "1000"  # comma between digits: punctuation removed
    assert metrics.normalize_vqa("yes!") == "yes"
    assert metrics.normalize_vqa("3.5") == "3.5"  # a period between digits stays
    assert metrics.normalize_vqa("black/white") == "black white"


def test_vqa_accuracy_is_the_leave_one_out_mean():
    # 2 humans said red, 8 blue: holding out a red leaves 1 match (1/3), holding out a blue leaves 2 (2/3)
    assert metrics.vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert metrics.vqa_accuracy("Two", ["2"] * 3 + ["two"] * 7) == 1.0  # number words normalised on both sides
    assert metrics.vqa_accuracy("green", ["red"] * 10) == 0.0
    assert metrics.vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0  # >= 3 matches in every subset


def test_pope_and_mme_and_circular_by_hand():
    pairs = [("Yes, there is.", "yes"), ("No.", "yes"), ("There is not a dog.", "no"), ("yes", "no"), ("no", "no")]
    # tp=1 fn=1 tn=2 fp=1: acc 3/5, precision 1/2, recall 1/2, f1 1/2, yes-ratio 2/5
    assert metrics.pope_scores(pairs) == {"accuracy": 60.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 40.0}
    rows = [("existence", "a", "Yes", "yes"), ("existence", "a", "No", "no"), ("existence", "b", "Yes", "yes"),
            ("existence", "b", "Yes", "no"), ("code_reasoning", "c", "No", "no"), ("code_reasoning", "c", "No", "yes")]
    out = metrics.mme_scores(rows)
    assert out["subtasks"] == {"existence": 125.0, "code_reasoning": 50.0}  # 75 + 50; 50 + 0
    assert (out["perception"], out["cognition"]) == (125.0, 50.0)
    assert metrics.circular_accuracy([(5, True), (1_000_005, True), (2_000_005, True), (6, True), (1_000_006, False)]) == 50.0
    assert [metrics.option_letter(p, "ABCD") for p in ["B", "(C) a cat", "D.", "E", "the answer is A"]] == ["B", "C", "D", None, None]
    assert metrics.exact_match(" Yes.", "yes") == 1.0 and metrics.exact_match("left", "right") == 0.0


# ----------------------------------------------------------------------------- official-format fixtures


def _image(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    # VQAv2: questions + annotations JSON, COCO-named images
    v = root / "vqav2"
    _image(v / "val2014" / "COCO_val2014_000000000042.jpg")
    (v / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": [
        {"image_id": 42, "question": "What color is it?", "question_id": 420}, {"image_id": 43, "question": "Where?", "question_id": 430},
        {"image_id": 42, "question_id": 421}]}))
    (v / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 420, "image_id": 42, "answers": [{"answer": "red"}] * 10},
        {"question_id": 430, "image_id": 43, "answers": [{"answer": "kitchen"}] * 10}]}))
    # GQA: {qid: {...}}
    g = root / "gqa"
    _image(g / "images" / "n123.jpg")
    (g / "testdev_balanced_questions.json").write_text(json.dumps({"q1": {"imageId": "n123", "question": "Is it red?", "answer": "yes"}}))
    # TextVQA
    t = root / "textvqa"
    _image(t / "train_images" / "abc.jpg")
    (t / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [{"question_id": 1, "question": "What does it say?", "image_id": "abc", "answers": ["stop"] * 10}]}))
    # POPE: one JSON object per line per split, one malformed line
    p = root / "pope"
    _image(p / "val2014" / "COCO_val2014_000000000042.jpg")
    lines = [json.dumps({"question_id": i, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?", "label": lab})
             for i, lab in enumerate(["yes", "no"])]
    (p / "coco_pope_adversarial.json").write_text("\n".join(lines + ["{not json"]) + "\n")
    (p / "coco_pope_random.json").write_text(lines[0] + "\n")
    # MME: subtask folders with image + question file (question<TAB>answer)
    m = root / "mme"
    _image(m / "existence" / "0001.png")
    (m / "existence" / "0001.txt").write_text("Is there a red square? Please answer yes or no.\tYes\nIs there a dog? Please answer yes or no.\tNo\n")
    _image(m / "code_reasoning" / "images" / "x.png")
    (m / "code_reasoning" / "questions_answers_YN").mkdir(parents=True)
    (m / "code_reasoning" / "questions_answers_YN" / "x.txt").write_text("Does the code print 3?\tNo\nbad line without tab\n")
    # ScienceQA: problems.json + pid_splits.json + test/<pid>/image.png; the IMG subset skips imageless problems
    s = root / "scienceqa"
    _image(s / "test" / "7" / "image.png")
    (s / "problems.json").write_text(json.dumps({
        "7": {"question": "Which is red?", "choices": ["sky", "apple"], "answer": 1, "hint": "", "image": "image.png", "split": "test"},
        "8": {"question": "No image", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "test"}}))
    (s / "pid_splits.json").write_text(json.dumps({"test": ["7", "8"]}))
    # MMBench: TSV with base64 images; circular passes share index mod 1e6
    b = root / "mmbench"
    b.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (20, 20, 200)).save(buf, format="PNG")
    blob = base64.b64encode(buf.getvalue()).decode()
    with open(b / "mmbench_dev_en.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        w.writerow([3, "What colour?", "nan", "red", "blue", "green", "black", "B", "attr", blob])
        w.writerow([1_000_003, "What colour?", "nan", "blue", "green", "black", "red", "A", "attr", blob])
    return root


def test_loaders_read_each_official_format(data):
    vqa = load_task(f"vqav2={data / 'vqav2'}")
    assert [s.id for s in vqa.samples] == ["420", "430", "421"]
    assert vqa.samples[0].question.startswith("What color is it?") and vqa.samples[0].answer == ["red"] * 10
    assert vqa.samples[0].load_image().size == (40, 40)
    assert vqa.samples[2].error and "421" in vqa.samples[2].error  # missing question text: a recorded failure
    with pytest.raises(VTCError, match="image"):
        vqa.samples[1].load_image()  # image 43 is not on disk
    assert load_task(f"gqa={data / 'gqa'}").samples[0].answer == "yes"
    assert load_task(f"textvqa={data / 'textvqa'}").samples[0].answer == ["stop"] * 10
    pope = load_task(f"pope={data / 'pope'}")
    assert [s.meta["split"] for s in pope.samples] == ["adversarial"] * 3 + ["random"]
    assert pope.samples[2].error and "line 3" in pope.samples[2].error
    mme = load_task(f"mme={data / 'mme'}")
    assert sorted(s.meta["subtask"] for s in mme.samples if not s.error) == ["code_reasoning", "existence", "existence"]
    assert sum(bool(s.error) for s in mme.samples) == 1
    sqa = load_task(f"scienceqa_img={data / 'scienceqa'}")
    assert [s.id for s in sqa.samples] == ["7"] and sqa.samples[0].answer == "B" and "B. apple" in sqa.samples[0].question
    mmb = load_task(f"mmbench={data / 'mmbench'}")
    assert [s.answer for s in mmb.samples] == ["B", "A"] and mmb.samples[0].load_image().size == (40, 40)


def test_bad_task_names_and_paths_are_clear(data):
    with pytest.raises(VTCError, match="unknown task 'vqa3'"):
        load_task("vqa3")
    with pytest.raises(VTCError, match="vqav2=PATH"):
        load_task("vqav2")
    with pytest.raises(VTCError, match="does not exist"):
        load_task(f"gqa={data / 'nope'}")


# ----------------------------------------------------------------------------- the runner on the tiny model


def test_runner_records_failures_and_scores_the_rest(tiny_pipe, data, tmp_path):
    with pytest.raises(VTCError, match="17 tokens is more than"):
        make_plan(tiny_pipe, ["synthetic"], ["random"], ["17"], 2)
    plan = make_plan(tiny_pipe, [f"vqav2={data / 'vqav2'}", f"pope={data / 'pope'}", f"mmbench={data / 'mmbench'}"], ["none", "random"], ["4", "auto"], None)
    assert plan.skipped == ["random@auto (no dynamic rule)"]
    assert BenchRunner(tiny_pipe, tmp_path / "out", batch_size=2).run(plan) == 2 * (3 + 4 + 2)
    records = read_records(tmp_path / "out")
    by = {(r["task"], r["sample_id"], r["method"]): r for r in records}
    assert "image" in by[("vqav2", "430", "none")]["error"]  # missing file: recorded, the batch-mate still scored
    ok = by[("vqav2", "420", "random")]
    assert ok["error"] is None and ok["tokens_kept"] == 4 and ok["score"] in (0.0, 1.0) and ok["flops"] > 0
    assert by[("vqav2", "420", "none")]["tokens_kept"] == 16
    assert "malformed" in by[("pope", "adversarial/line3", "none")]["error"]
    rows = write_report(tmp_path / "out")
    full = next(r for r in rows if r["task"] == "pope" and r["method"] == "none")
    assert set(full["metrics"]["splits"]) == {"adversarial", "random"} and full["failed"] == 1
    for name in ("report.md", "report.csv", "pareto.png", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 100
    assert "data:image/png;base64" in (tmp_path / "out" / "report.html").read_text()


def test_store_skips_a_torn_last_line(tmp_path):
    store = ResultStore(tmp_path, shard=0)
    store.append({"task": "t", "method": "m", "budget": "4", "sample_id": "1", "score": 1.0})
    store.close()
    with open(tmp_path / "results.0.jsonl", "a") as f:
        f.write('{"task": "t", "method": "m", "bud')  # a kill mid-write
    assert len(read_records(tmp_path)) == 1
    store = ResultStore(tmp_path, shard=0)  # reopening cuts the torn line before appending
    store.append({"task": "t", "method": "m", "budget": "4", "sample_id": "2", "score": 0.0})
    store.close()
    assert [r["sample_id"] for r in read_records(tmp_path)] == ["1", "2"]


def _bench_cmd(tiny_dirs, out, limit=120):
    return [sys.executable, "-m", "vtc.cli", "bench", "--model", str(tiny_dirs[0]), "--clip", str(tiny_dirs[1]),
            "--tasks", "synthetic", "--methods", "none,random,fastervlm", "--budgets", "4", "--limit", str(limit),
            "--batch-size", "2", "--out", str(out)]


def _results(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(out)]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_dirs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_bench_cmd(tiny_dirs, tmp_path / "whole"), check=True, env=env, capture_output=True)
    expected = _results(tmp_path / "whole")
    assert len(expected) == 3 * 120

    proc = subprocess.Popen(_bench_cmd(tiny_dirs, tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = tmp_path / "killed" / "results.0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not shard.exists() or shard.read_text().count("\n") < 60):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_records(tmp_path / "killed"))
    assert 0 < partial < len(expected), "the run must be killed mid-way"
    subprocess.run(_bench_cmd(tiny_dirs, tmp_path / "killed"), check=True, env=env, capture_output=True)
    assert _results(tmp_path / "killed") == expected


def test_two_processes_give_the_same_results_as_one(tiny_dirs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_bench_cmd(tiny_dirs, tmp_path / "one", limit=20), check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vtc.cli"]
    result = subprocess.run(launch + _bench_cmd(tiny_dirs, tmp_path / "two", limit=20)[3:], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in (tmp_path / "two").glob("results.*.jsonl")} == {"results.0.jsonl", "results.1.jsonl"}
    assert _results(tmp_path / "two") == _results(tmp_path / "one")


def test_a_sample_whose_generation_raises_is_a_recorded_failure_and_its_batch_mates_still_score(tiny_pipe, tmp_path, monkeypatch):
    from vtc.bench.runner import Plan
    from vtc.bench.tasks import Task, TaskSample
    from vtc.methods import Budget

    generate = tiny_pipe.generate

    def flaky(inputs, questions, *args, **kwargs):  # a failure deep inside generation, not a VTCError
        if any("boom" in q for q in questions):
            raise RuntimeError("CUDA out of memory (simulated)")
        return generate(inputs, questions, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe, "generate", flaky)
    image = lambda: Image.new("RGB", (40, 40), (200, 30, 30))  # noqa: E731
    questions = ["what color ?", "boom what color ?", "what is <image> this ?", "what shape ?", "boom alone ?"]
    samples = [TaskSample(str(i), q, "red", image, {}) for i, q in enumerate(questions)]
    task = Task("synthetic", samples, lambda p, s: 1.0, lambda recs: {"score": 0.0}, 2)
    plan = Plan([task], [("random", Budget.parse("4"))], [])
    # batches of 2: [ok, boom], [special token, ok], [boom alone]
    assert BenchRunner(tiny_pipe, tmp_path / "out", batch_size=2).run(plan) == 5
    by = {r["sample_id"]: r for r in read_records(tmp_path / "out")}
    assert by["1"]["error"] == "RuntimeError: CUDA out of memory (simulated)" and "score" not in by["1"]
    assert by["4"]["error"] == "RuntimeError: CUDA out of memory (simulated)"  # alone in its batch: recorded, the run goes on
    assert "'<image>'" in by["2"]["error"] and "special token" in by["2"]["error"]
    for ok in ("0", "3"):
        assert by[ok]["error"] is None and by[ok]["score"] == 1.0 and by[ok]["tokens_kept"] == 4 and by[ok]["batch_size"] == 1
