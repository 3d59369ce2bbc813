"""Bad inputs end in a clear VTCError or a recorded per-sample failure, never a traceback.

Property-based (hypothesis) where the input space is large: budgets, questions, image modes,
sizes and files, base64 payloads, annotation records of every loader. Explicit cases for every
loader: wrong root and field types, missing files, non-UTF-8 text, empty tasks, corrupt and
missing images, base64 that is not an image; a valid sample beside the faulty ones still scores.
Concurrent runs on one result store: refused with the holder named, a killed holder's lock is stale.
"""

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vtc.bench.runner import BenchRunner, load_tasks, make_plan
from vtc.bench.store import ResultStore, read_records, record_key
from vtc.bench.tasks import load_task
from vtc.io import check_question, load_image
from vtc.methods import Budget, VTCError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- builders of official-format data


def png(size=(40, 40), colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def put(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


VALID_VQA_Q = {"image_id": 42, "question": "What color is it?", "question_id": 1}
VALID_VQA_A = {"question_id": 1, "answers": [{"answer": "red"}] * 10}
VALID_POPE = {"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?", "label": "yes"}
VALID_SQA = {"question": "Which is red?", "choices": ["sky", "apple"], "answer": 1, "hint": "", "image": "image.png"}
MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
VALID_MMB = ["3", "What colour?", "nan", "red", "blue", "green", "black", "B", "attr", base64.b64encode(png()).decode()]


def vqav2_dir(root: Path, questions=(), annotations=()) -> Path:
    put(root / "val2014" / "COCO_val2014_000000000042.jpg", png(fmt="JPEG"))
    put(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [VALID_VQA_Q, *questions]})
    put(root / "v2_mscoco_val2014_annotations.json", {"annotations": [VALID_VQA_A, *annotations]})
    return root


def gqa_dir(root: Path, extra=None) -> Path:
    put(root / "images" / "n1.jpg", png(fmt="JPEG"))
    put(root / "testdev_balanced_questions.json", {"q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes"}, **(extra or {})})
    return root


def textvqa_dir(root: Path, rows=()) -> Path:
    put(root / "train_images" / "abc.jpg", png(fmt="JPEG"))
    put(root / "TextVQA_0.5.1_val.json", {"data": [{"question_id": 1, "question": "What does it say?", "image_id": "abc",
                                                    "answers": ["stop"] * 10}, *rows]})
    return root


def pope_dir(root: Path, lines=()) -> Path:
    put(root / "val2014" / "COCO_val2014_000000000042.jpg", png(fmt="JPEG"))
    put(root / "coco_pope_random.json", "\n".join([json.dumps(VALID_POPE), *lines]) + "\n")
    return root


def mme_dir(root: Path, lines=()) -> Path:
    put(root / "existence" / "0001.png", png())
    put(root / "existence" / "0001.txt", "\n".join(["Is there a red square? Please answer yes or no.\tYes", *lines]) + "\n")
    return root


def scienceqa_dir(root: Path, problems=None, test=None) -> Path:
    put(root / "test" / "7" / "image.png", png())
    put(root / "problems.json", {"7": VALID_SQA, **(problems or {})})
    put(root / "pid_splits.json", {"test": test or ["7"]})
    return root


def mmbench_dir(root: Path, rows=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mmbench_dev_en.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(MMB_HEADER)
        writer.writerow(VALID_MMB)
        for row in rows:
            writer.writerow(row)
    return root


BUILDERS = {"vqav2": vqav2_dir, "gqa": gqa_dir, "textvqa": textvqa_dir, "pope": pope_dir, "mme": mme_dir,
            "scienceqa_img": scienceqa_dir, "mmbench": mmbench_dir}
MAIN_FILE = {"vqav2": "v2_OpenEnded_mscoco_val2014_questions.json", "gqa": "testdev_balanced_questions.json",
             "textvqa": "TextVQA_0.5.1_val.json", "pope": "coco_pope_random.json", "mme": "existence/0001.txt",
             "scienceqa_img": "problems.json", "mmbench": "mmbench_dev_en.tsv"}
VALID_ID = {"vqav2": "1", "gqa": "q1", "textvqa": "1", "pope": "random/1", "mme": "existence/0001/0", "scienceqa_img": "7", "mmbench": "3"}


def test_the_valid_builders_load(tmp_path):
    for name, build in BUILDERS.items():
        task = load_task(f"{name}={build(tmp_path / name)}")
        assert [s.id for s in task.samples] == [VALID_ID[name]] and task.samples[0].error is None
        assert task.samples[0].load_image().size == (40, 40)


# ----------------------------------------------------------------------------- wrong files: a VTCError naming the file


def _latin1(path: Path) -> int:
    """Put a Latin-1 byte (é) into the file's first question; returns its byte offset."""
    data = path.read_bytes()
    for anchor in (b"What", b"Is ", b"Which"):
        if anchor in data:
            offset = data.index(anchor)
            path.write_bytes(data[:offset] + b"\xe9" + data[offset:])
            return offset
    raise AssertionError(f"no question in {path}")


def _json_rewrite(name):
    def rewrite(root):
        path = root / name
        return put(path, json.loads(path.read_text()))
    return rewrite


WRONG_FILES = [
    # (loader, fault, how the valid data is broken: fn(root), regex the message must match)
    ("vqav2", "questions root is an array", lambda r: put(r / MAIN_FILE["vqav2"], [VALID_VQA_Q]), r"questions\.json: expected the VQAv2 questions file.*root is a JSON array"),
    ("vqav2", "annotations root is an array", lambda r: put(r / "v2_mscoco_val2014_annotations.json", [VALID_VQA_A]), r"annotations\.json: expected the VQAv2 annotations file.*root is a JSON array"),
    ("vqav2", "'questions' is an object", lambda r: put(r / MAIN_FILE["vqav2"], {"questions": VALID_VQA_Q}), r"'questions' is a JSON object"),
    ("vqav2", "no 'questions' key", lambda r: put(r / MAIN_FILE["vqav2"], {"data": [VALID_VQA_Q]}), r"has no 'questions' \(its keys: data\)"),
    ("vqav2", "annotations file missing", lambda r: (r / "v2_mscoco_val2014_annotations.json").unlink(), r"no file matching '\*annotations\*\.json'"),
    ("vqav2", "not JSON", lambda r: put(r / MAIN_FILE["vqav2"], "{'questions': []}"), r"questions\.json is not valid JSON .*line 1 column 2"),
    ("vqav2", "empty questions", lambda r: put(r / MAIN_FILE["vqav2"], {"questions": []}), r"task 'vqav2' under .* has no samples"),
    ("vqav2", "every record malformed", lambda r: put(r / MAIN_FILE["vqav2"], {"questions": [{"question": 5}]}), r"none of its 1 samples is usable \(first: .*'question' must be a string"),
    ("vqav2", "deeply nested JSON", lambda r: put(r / MAIN_FILE["vqav2"], "[" * 100_000 + "]" * 100_000), r"not usable JSON \(nested too deeply\)"),
    ("gqa", "root is an array", lambda r: put(r / MAIN_FILE["gqa"], [{"question": "q"}]), r"testdev_balanced_questions\.json: expected GQA questions.*root is a JSON array"),
    ("gqa", "root is a string", lambda r: put(r / MAIN_FILE["gqa"], "\"questions\""), r"root is a JSON string"),
    ("gqa", "empty object", lambda r: put(r / MAIN_FILE["gqa"], {}), r"has no samples"),
    ("gqa", "questions file missing", lambda r: (r / MAIN_FILE["gqa"]).unlink(), r"no file matching '\*questions\*\.json'"),
    ("gqa", "a VQAv2 file given to GQA", lambda r: put(r / MAIN_FILE["gqa"], {"questions": [VALID_VQA_Q]}), r"none of its 1 samples is usable \(first: .*expected a JSON object, got a array"),
    ("textvqa", "root is an array", lambda r: put(r / MAIN_FILE["textvqa"], []), r"expected a TextVQA annotation file.*root is a JSON array"),
    ("textvqa", "'data' is a string", lambda r: put(r / MAIN_FILE["textvqa"], {"data": "x"}), r"'data' is a JSON string"),
    ("textvqa", "file missing", lambda r: (r / MAIN_FILE["textvqa"]).unlink(), r"no file matching '\*TextVQA\*\.json'"),
    ("textvqa", "empty data", lambda r: put(r / MAIN_FILE["textvqa"], {"data": []}), r"has no samples"),
    ("pope", "no split files", lambda r: (r / MAIN_FILE["pope"]).unlink(), r"no POPE split files"),
    ("pope", "a JSON array instead of JSON lines", lambda r: put(r / MAIN_FILE["pope"], json.dumps([VALID_POPE], indent=1)), r"coco_pope_random\.json: expected POPE questions, one JSON object per line.*none of its 8 lines"),
    ("pope", "blank file", lambda r: put(r / MAIN_FILE["pope"], "\n\n"), r"has no samples"),
    ("mme", "no subtask folders", lambda r: [p.unlink() for p in (r / "existence").iterdir()] and (r / "existence").rmdir(), r"no MME subtask folders"),
    ("mme", "comma-separated question file", lambda r: put(r / MAIN_FILE["mme"], "Is it red?,Yes\nIs it blue?,No\n"), r"0001\.txt: expected MME questions, one 'question<TAB>Yes\|No' per line; none of its 2 lines"),
    ("mme", "subtask folder without question files", lambda r: (r / MAIN_FILE["mme"]).unlink(), r"no MME subtask folders with question files"),
    ("scienceqa_img", "problems root is an array", lambda r: put(r / "problems.json", [VALID_SQA]), r"problems\.json: expected ScienceQA's problems\.json.*root is a JSON array"),
    ("scienceqa_img", "pid_splits root is an array", lambda r: put(r / "pid_splits.json", ["7"]), r"pid_splits\.json: expected ScienceQA's pid_splits\.json.*root is a JSON array"),
    ("scienceqa_img", "'test' is an object", lambda r: put(r / "pid_splits.json", {"test": {"7": 1}}), r"'test' is a JSON object"),
    ("scienceqa_img", "pid_splits missing", lambda r: (r / "pid_splits.json").unlink(), r"no file matching 'pid_splits\.json'"),
    ("scienceqa_img", "no test problem has an image", lambda r: put(r / "problems.json", {"7": {**VALID_SQA, "image": None}}), r"has no samples"),
    ("mmbench", "no TSV", lambda r: (r / MAIN_FILE["mmbench"]).unlink(), r"no file matching '\*\.tsv'"),
    ("mmbench", "comma-separated instead of tabs", lambda r: put(r / MAIN_FILE["mmbench"], ",".join(MMB_HEADER) + "\n"), r"expected MMBench's tab-separated columns.*missing: index, question, A, B, answer, image"),
    ("mmbench", "header only", lambda r: put(r / MAIN_FILE["mmbench"], "\t".join(MMB_HEADER) + "\n"), r"has no samples"),
] + [
    (name, "not UTF-8 (a Latin-1 byte)", None, None) for name in BUILDERS
]


@pytest.mark.parametrize("name, fault, breaker, message", WRONG_FILES, ids=[f"{c[0]}: {c[1]}" for c in WRONG_FILES])
def test_a_wrong_file_is_a_clear_error(tmp_path, name, fault, breaker, message):
    root = BUILDERS[name](tmp_path / name)
    if breaker is None:  # the encoding case: the message names the file and the byte offset of the bad byte
        offset = _latin1(root / MAIN_FILE[name])
        message = rf"{MAIN_FILE[name].split('/')[-1]} is not UTF-8 text: byte 0xe9 at offset {offset} "
    else:
        breaker(root)
    with pytest.raises(VTCError, match=message):
        load_tasks([f"{name}={root}"], None)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_byte_order_mark_is_accepted(tmp_path, name):
    root = BUILDERS[name](tmp_path / name)
    path = root / MAIN_FILE[name]
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    task = load_task(f"{name}={root}")
    assert [(s.id, s.error) for s in task.samples] == [(VALID_ID[name], None)]
    offset = _latin1(path)  # the offset of a bad byte counts the mark's 3 bytes
    with pytest.raises(VTCError, match=f"byte 0xe9 at offset {offset} "):
        load_task(f"{name}={root}")


def test_no_tasks_is_a_clear_error():
    with pytest.raises(VTCError, match="no tasks given"):
        load_tasks([], None)


def test_an_empty_task_fails_in_the_cli_before_any_sample_runs(tiny_dirs, tmp_path):
    from typer.testing import CliRunner

    from vtc.cli import app

    root = vqav2_dir(tmp_path / "vqav2")
    put(root / MAIN_FILE["vqav2"], {"questions": []})
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_dirs[0]), "--clip", str(tiny_dirs[1]), "--tasks", f"vqav2={root}",
                                      "--methods", "none", "--budgets", "auto", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has no samples" in " ".join(result.output.split())
    assert not list((tmp_path / "out").glob("results.*.jsonl"))


# ----------------------------------------------------------------------------- bad records: recorded failures, the valid sample still scores


def _truncated_png() -> bytes:
    data = png(size=(64, 64))
    return data[: len(data) // 2]


def _faulty_data(root: Path) -> tuple[list[str], dict[tuple[str, str], str]]:
    """Every loader's valid data plus faulty records; returns the task specs and {(task, sample id): expected error}."""
    expect = {}
    v = vqav2_dir(root / "vqav2", questions=[
        {"image_id": 42, "question": 5, "question_id": 2},
        {"image_id": 42, "question_id": 3},
        {"image_id": [42], "question": "Where?", "question_id": 4},
        {"image_id": 42, "question": "Where?", "question_id": 5},
        {"image_id": 42, "question": "Where?", "question_id": 6},
        {"image_id": 42, "question": "Where?", "question_id": 7},
        {"image_id": 42, "question": "Where?", "question_id": 8},
        {"image_id": 42, "question": "Where?"},
        {"image_id": 42, "question": "What is <image> here?", "question_id": 9},
        {"image_id": 42, "question": "   ", "question_id": 10},
        "What color is it?",
        {"image_id": 42, "question": "Duplicate?", "question_id": 1},
        {"image_id": 99, "question": "Missing image?", "question_id": 11},
        {"image_id": 77, "question": "Corrupt image?", "question_id": 12},
        {"image_id": 78, "question": "Truncated image?", "question_id": 13},
        {"image_id": 42, "question": "x " * 2500, "question_id": 14},
    ], annotations=[
        {"question_id": 5, "answers": "red"}, {"question_id": 6, "answers": []}, {"question_id": 7, "answers": [{"answer": 3}]},
        {"question_id": 9, "answers": [{"answer": "a"}]}, {"question_id": 11, "answers": [{"answer": "a"}]},
        {"question_id": 12, "answers": [{"answer": "a"}]}, {"question_id": 13, "answers": [{"answer": "a"}]},
        {"question_id": 14, "answers": [{"answer": "a"}]}, ["not", "an", "annotation"],
    ])
    put(v / "val2014" / "COCO_val2014_000000000077.jpg", b"this is not a jpeg")
    put(v / "val2014" / "COCO_val2014_000000000078.png", _truncated_png())
    expect.update({("vqav2", "2"): "'question' must be a string, got a number", ("vqav2", "3"): "no 'question'",
                   ("vqav2", "4"): "'image_id' must be a string or an integer, got a array",
                   ("vqav2", "5"): "'answers' must be a non-empty array", ("vqav2", "6"): "'answers' must be a non-empty array",
                   ("vqav2", "7"): "'answer' must be a string, got a number", ("vqav2", "8"): "no annotation for it",
                   ("vqav2", "#9"): "no 'question_id'", ("vqav2", "9"): "contains '<image>'", ("vqav2", "10"): "'question' is empty",
                   ("vqav2", "#12"): "expected a JSON object, got a string", ("vqav2", "1~2"): "duplicate id 1",
                   ("vqav2", "11"): "image: image", ("vqav2", "12"): "cannot be read", ("vqav2", "13"): "cannot be read",
                   ("vqav2", "14"): "at most 4000 are accepted"})
    gqa_dir(root / "gqa", {"q2": ["Is it red?"], "q3": {"imageId": "n1", "question": "Is it red?", "answer": 1},
                           "q4": {"imageId": None, "question": "Is it red?", "answer": "no"}, "q5": {"imageId": "n1", "answer": "no"},
                           "q6": {"imageId": "gone", "question": "Is it red?", "answer": "no"}})
    expect.update({("gqa", "q2"): "expected a JSON object, got a array", ("gqa", "q3"): "'answer' must be a string",
                   ("gqa", "q4"): "'imageId' must be a string or an integer, got a null", ("gqa", "q5"): "no 'question'",
                   ("gqa", "q6"): "no such file"})
    textvqa_dir(root / "textvqa", [{"question_id": 2, "question": "What?", "image_id": "abc", "answers": ["a", 1]},
                                   {"question_id": 3, "question": "What?", "image_id": {"id": "abc"}, "answers": ["a"]},
                                   {"question_id": True, "question": "What?", "image_id": "abc", "answers": ["a"]}])
    expect.update({("textvqa", "2"): "'answers' must be a non-empty array of strings", ("textvqa", "3"): "'image_id' must be a string or an integer, got a object",
                   ("textvqa", "#4"): "'question_id' must be a string or an integer, got a boolean"})
    pope_dir(root / "pope", ["{not json", json.dumps({**VALID_POPE, "question_id": 2, "label": "maybe"}),
                             json.dumps({**VALID_POPE, "question_id": 3, "label": 1}), json.dumps([VALID_POPE]),
                             json.dumps({k: v for k, v in VALID_POPE.items() if k != "text"}),
                             json.dumps({**VALID_POPE, "question_id": 4, "image": "COCO_val2014_000000000404.jpg"})])
    expect.update({("pope", "random/line2"): "not JSON", ("pope", "random/line3"): "'label' must be yes or no, got 'maybe'",
                   ("pope", "random/line4"): "'label' must be a string, got a number", ("pope", "random/line5"): "expected a JSON object, got a array",
                   ("pope", "random/line6"): "no 'text'", ("pope", "random/4"): "no such file"})
    m = mme_dir(root / "mme", ["no tab here", "Is it red?\tMaybe", "\tYes", "Is it\tred?\tYes"])
    put(m / "existence" / "0002.txt", "Is there a cat?\tNo\n")  # no 0002 image
    put(m / "existence" / "0003.png", b"\x89PNG\r\n\x1a\n but not really")
    put(m / "existence" / "0003.txt", "Is there a cat?\tNo\n")
    expect.update({("mme", f"existence/0001/{n}"): "is not 'question<TAB>Yes|No'" for n in (1, 2, 3, 4)})
    expect.update({("mme", "existence/0002/0"): "no such file", ("mme", "existence/0003/0"): "cannot be read"})
    s = scienceqa_dir(root / "scienceqa", {
        "8": {**VALID_SQA, "answer": 2}, "9": {**VALID_SQA, "answer": True}, "10": {**VALID_SQA, "choices": "sky, apple"},
        "11": {**VALID_SQA, "hint": 3}, "12": ["not", "a", "problem"], "13": {**VALID_SQA}, "14": {**VALID_SQA}},
        test=["7", "8", "9", "10", "11", "12", "404", "13", "14", ["7"]])
    put(s / "test" / "14" / "image.png", b"GIF89a broken")
    expect.update({("scienceqa_img", "8"): "'answer' must be an option number from 0 to 1, got 2",
                   ("scienceqa_img", "9"): "'answer' must be an option number from 0 to 1, got True",
                   ("scienceqa_img", "10"): "'choices' must be a non-empty array of strings",
                   ("scienceqa_img", "11"): "'hint' must be a string, got a number", ("scienceqa_img", "12"): "expected a JSON object, got a array",
                   ("scienceqa_img", "404"): "not in problems.json", ("scienceqa_img", "13"): "no such file",
                   ("scienceqa_img", "14"): "cannot be read", ("scienceqa_img", "#10"): "test entry 10 is not a problem id"})
    good = VALID_MMB
    mmbench_dir(root / "mmbench", [
        ["x"] + good[1:],
        ["5", *good[1:7], "E", *good[8:]],
        ["6", good[1], "nan", "red", "blue", "nan", "nan", "C", *good[8:]],
        ["7", *good[1:-1], "abc"],
        ["8", *good[1:-1], base64.b64encode(b"plain text, not an image").decode()],
        ["9", *good[1:-1], base64.b64encode(_truncated_png()).decode()],
        ["10", "nan", *good[2:]],
        ["11", *good[1:-1], ""],
    ])
    expect.update({("mmbench", "row2"): "'index' must be an integer, got 'x'", ("mmbench", "row3"): "option letters A, B, C, D, got 'E'",
                   ("mmbench", "row4"): "option letters A, B, got 'C'", ("mmbench", "row5"): "'image' is not base64",
                   ("mmbench", "8"): "cannot be read", ("mmbench", "9"): "cannot be read", ("mmbench", "row8"): "'question' is empty",
                   ("mmbench", "row9"): "'image' is empty"})
    specs = [f"vqav2={root / 'vqav2'}", f"gqa={root / 'gqa'}", f"textvqa={root / 'textvqa'}", f"pope={root / 'pope'}",
             f"mme={root / 'mme'}", f"scienceqa_img={root / 'scienceqa'}", f"mmbench={root / 'mmbench'}"]
    return specs, expect


BAD_RECORDS = 53  # len(expect) of _faulty_data, checked below


def test_bad_records_are_recorded_failures_and_the_valid_samples_score(tiny_pipe, tmp_path):
    specs, expect = _faulty_data(tmp_path / "data")
    assert len(expect) == BAD_RECORDS
    plan = make_plan(tiny_pipe, specs, ["none"], ["auto"], None)
    BenchRunner(tiny_pipe, tmp_path / "out", batch_size=4).run(plan)
    records = {(r["task"], r["sample_id"]): r for r in read_records(tmp_path / "out")}
    for key, message in expect.items():
        assert key in records, f"no record for {key}"
        assert message in (records[key]["error"] or ""), (key, records[key]["error"])
    for task, sample_id in VALID_ID.items():  # beside the faulty ones, in the same batches
        record = records[(task, sample_id)]
        assert record["error"] is None and record["score"] in (0.0, 1.0) and record["tokens_kept"] == 16
    assert set(records) == set(expect) | set(VALID_ID.items())  # nothing else is scored or lost


# ----------------------------------------------------------------------------- properties of records, per loader


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


ODD_VALUES = st.sampled_from(["", " ", "maybe", "Yes", "E", "<image>", "nan", "²", "9" * 5000, 2, -1, 1, True, None, [], ["a", 1], [{"answer": 3}], {}])


def records(valid: dict, id_key: str | None = None):
    """Mostly the valid record with one field replaced by any JSON value (or dropped); also any JSON value at all.

    A near-valid record takes a new id from a small range (so ids sometimes collide) unless its id is the field replaced.
    """
    value = st.one_of(ODD_VALUES, ODD_VALUES, ODD_VALUES, json_values)

    def mutate(key, new, drop, fresh):
        row = {**valid, key: new}
        if drop:
            del row[key]
        if id_key and key != id_key:
            row[id_key] = type(valid[id_key])(fresh)
        return row

    near_valid = st.builds(mutate, st.sampled_from(sorted(valid)), value, st.booleans(), st.integers(100, 104))
    return near_valid | near_valid | near_valid | json_values


def _check_loaded(task, valid_id):
    """The valid sample is intact, and every other sample is either a recorded failure or fully usable."""
    assert task.samples[0].id == valid_id and task.samples[0].error is None
    ids = [s.id for s in task.samples]
    assert len(ids) == len(set(ids))  # the store keys records by id
    for sample in task.samples[1:]:
        if sample.error is not None:
            assert isinstance(sample.error, str) and sample.error
            continue
        assert check_question(sample.question, sample.id)
        for prediction in ("yes", "B", "red", ""):
            assert 0.0 <= task.score(prediction, sample) <= 1.0
        if isinstance(sample.answer, str):  # a usable record can be answered right (e.g. its letter is one of its options)
            assert task.score(sample.answer, sample) == 1.0


def _load_with(name, build, *args):
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp) / name, *args)
        task = load_task(f"{name}={root}")
        _check_loaded(task, VALID_ID[name])
        return task


VALID_GQA = {"imageId": "n1", "question": "Is it red?", "answer": "yes"}
VALID_TEXTVQA = {"question_id": 1, "question": "What does it say?", "image_id": "abc", "answers": ["stop"] * 10}


@FAST
@given(questions=st.lists(records(VALID_VQA_Q, "question_id"), min_size=1, max_size=8), annotations=st.lists(records(VALID_VQA_A, "question_id"), min_size=1, max_size=8))
def test_any_vqav2_record(questions, annotations):
    _load_with("vqav2", vqav2_dir, questions, annotations)


@FAST
@given(rows=st.dictionaries(st.sampled_from(["q2", "q3"]) | st.text(min_size=1, max_size=4), records(VALID_GQA), min_size=1, max_size=8))
def test_any_gqa_record(rows):
    _load_with("gqa", gqa_dir, {k: v for k, v in rows.items() if k != "q1"})


@FAST
@given(rows=st.lists(records(VALID_TEXTVQA, "question_id"), min_size=1, max_size=8))
def test_any_textvqa_record(rows):
    _load_with("textvqa", textvqa_dir, rows)


@FAST
@given(lines=st.lists(records(VALID_POPE, "question_id").map(json.dumps) | st.text(max_size=40), min_size=1, max_size=8))
def test_any_pope_line(lines):
    _load_with("pope", pope_dir, lines)


@FAST
@given(lines=st.lists(st.text(max_size=40) | st.tuples(st.text(max_size=20) | ODD_VALUES.map(str), st.sampled_from(["Yes", "no", "maybe", "", " YES "])).map("\t".join),
                      min_size=1, max_size=8))
def test_any_mme_line(lines):
    _load_with("mme", mme_dir, lines)


@FAST
@given(problems=st.lists(records(VALID_SQA), min_size=1, max_size=8), entry=json_values | st.just("7"))
def test_any_scienceqa_problem(problems, entry):
    pids = [str(8 + i) for i in range(len(problems))]
    _load_with("scienceqa_img", scienceqa_dir, dict(zip(pids, problems)), ["7", *pids, entry])


cells = st.text(max_size=10) | st.sampled_from(["nan", "", "A", "B", "E", "3", "4", "What?", "abc", base64.b64encode(b"not an image").decode()])


def _near_valid_row(column, cell, extra, short):
    row = [*VALID_MMB[:column], cell, *VALID_MMB[column + 1 :]] + extra
    return row[: column + 1] if short else row


@FAST
@given(rows=st.lists(st.builds(_near_valid_row, st.integers(0, len(VALID_MMB) - 1), cells, st.lists(cells, max_size=2), st.booleans()),
                     min_size=1, max_size=8))
def test_any_mmbench_row(rows):
    task = _load_with("mmbench", mmbench_dir, rows)
    for sample in task.samples[1:]:
        if sample.error is None:  # a row that parses: its image is a clear error or an image, never a traceback
            try:
                assert sample.load_image().mode == "RGB"
            except VTCError:
                pass


# ----------------------------------------------------------------------------- budgets and questions


@settings(max_examples=200, deadline=None)
@example(1.0).via("a ratio of 1 stays a ratio")
@example("1.0").via("a ratio of 1 stays a ratio")
@example(0).via("zero tokens")
@example("0.5%").via("a small percentage")
@given(st.one_of(st.text(max_size=12), st.integers(-10, 2**53), st.floats(), st.booleans(), st.none(),
                 st.from_regex(r"\s*-?\d{0,4}(\.\d{0,4})?(e-?\d)?%?\s*", fullmatch=True)))
def test_any_budget_parses_or_is_refused_clearly(value):
    try:
        budget = Budget.parse(value)
    except VTCError as exc:
        assert str(exc).startswith("budget")
        if isinstance(value, int) and not isinstance(value, bool):
            assert value <= 0
        if isinstance(value, float):
            assert not 0 < value <= 1
        return
    if isinstance(value, bool) or value is None:
        raise AssertionError(f"{value!r} accepted")
    if isinstance(value, int):
        assert (budget.kind, budget.value) == ("count", value)
    if isinstance(value, float):
        assert (budget.kind, budget.value) == ("ratio", value)
    assert Budget.parse(str(budget)) == budget  # the store and report keep budgets as text
    for n in (1, 16, 576):
        try:
            kept = budget.tokens(n)
        except VTCError:
            assert budget.kind == "auto" or (budget.kind == "count" and budget.value > n)
            continue
        assert 1 <= kept <= n


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30) | st.lists(st.integers(0xD780, 0xE020).map(chr), max_size=5).map("".join)
       | st.builds(lambda a, b: a + "<image>" + b, st.text(max_size=5), st.text(max_size=5)) | st.integers() | st.none())
def test_any_question_is_checked_or_refused(question):
    try:
        text = check_question(question, 3)
    except VTCError as exc:
        assert str(exc).startswith("question 3")
        assert not isinstance(question, str) or not question.strip() or "<image>" in question or any(0xD800 <= ord(c) <= 0xDFFF for c in question)
        return
    assert text == question.strip() and text and "<image>" not in text
    text.encode("utf-8")  # what a tokenizer needs


@settings(max_examples=15, deadline=None)
@given(st.text(max_size=40) | st.sampled_from(["what is <image> ?", "a\ud800b", "USER: </s> <s> <pad> ASSISTANT:", "\x00\x01", "\u202e\u200b"]))
def test_any_question_reaches_the_model_or_is_refused(tiny_pipe, question):
    image = Image.new("RGB", (40, 40), (1, 2, 3))
    try:
        inputs = tiny_pipe.prepare([image], [question])
    except VTCError:
        return
    image_token = tiny_pipe.adapter.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == tiny_pipe.adapter.num_patches  # exactly one image's tokens


# ----------------------------------------------------------------------------- images: modes, sizes, files, bytes


def _image_of(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    if mode == "I;16":
        return Image.fromarray(rng.randint(0, 65536, (height, width)).astype(np.uint16))
    if mode in ("I", "F"):
        return Image.fromarray(rng.randint(-(2**20), 2**20, (height, width)).astype(np.int32 if mode == "I" else np.float32))
    if mode == "RGBA":
        return Image.fromarray(rng.randint(0, 256, (height, width, 4)).astype(np.uint8), "RGBA")
    return Image.fromarray(rng.randint(0, 256, (height, width, 3)).astype(np.uint8), "RGB").convert(mode)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I", "F", "LAB", "HSV"]


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(MODES) | st.sampled_from(["RGBA", "I;16", "F"]), width=st.integers(1, 40), height=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_any_image_mode_and_size_loads_as_rgb_or_is_refused(mode, width, height, seed):
    image = _image_of(mode, width, height, seed)
    try:
        out = load_image(image)
    except VTCError as exc:
        assert (width < 2 or height < 2) and "at least 2x2" in str(exc), exc
        return
    assert width >= 2 and height >= 2, "an image under 2x2 was accepted"
    assert out.mode == "RGB" and out.size == (width, height)
    if mode == "RGBA":  # composited on white, by the alpha-over formula
        rgba = np.asarray(image, dtype=np.float64)
        expected = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
        assert np.abs(np.asarray(out, dtype=np.float64) - expected).max() <= 1.0
    if mode in ("I;16", "I", "F") and np.ptp(np.asarray(image)) > 0:  # rescaled from its own min..max, not clipped
        values, grey = np.asarray(image), np.asarray(out)[..., 0]
        assert grey[values == values.min()].max() == 0 and grey[values == values.max()].min() == 255


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(MODES), width=st.integers(2, 40), height=st.integers(2, 40), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["PNG", "TIFF", "JPEG", "BMP", "GIF", "WEBP"]), cut=st.none() | st.floats(0, 0.99))
def test_any_image_file_loads_as_rgb_or_is_refused(tmp_path_factory, mode, width, height, seed, fmt, cut):
    buf = io.BytesIO()
    try:
        _image_of(mode, width, height, seed).save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        return  # PIL cannot write this mode in this format
    data = buf.getvalue()[: None if cut is None else int(len(buf.getvalue()) * cut)]
    source = data if seed % 2 else put(tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}", data)  # bytes or a file
    try:
        out = load_image(source)
    except VTCError as exc:
        assert "cannot be read" in str(exc) and cut is not None, f"a whole {mode} {fmt} image was refused: {exc}"
        return
    assert out.mode == "RGB" and out.size == (width, height)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
@settings(max_examples=60, deadline=None)
@given(magic=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP", b"II*\x00"]),
       body=st.binary(max_size=200))
def test_any_bytes_are_an_image_or_a_clear_error(magic, body):
    try:
        out = load_image(magic + body, name="blob")
    except VTCError as exc:
        assert "'blob'" in str(exc)
        return
    assert out.mode == "RGB" and min(out.size) >= 2


def _claimed_size_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size (a decompression-bomb probe; nothing that size is decoded)."""
    data = bytearray(png(size=(4, 4)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(data[ihdr : ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_explicit_image_faults(tmp_path):
    cases = {
        "over our limit": (_claimed_size_png(12_000, 9_000), r"12000x9000 is over 100,000,000 pixels"),
        "over PIL's limit": (_claimed_size_png(40_000, 40_000), r"cannot be read .*decompression bomb"),
        "1 pixel high": (png(size=(40, 1)), r"is 40x1; at least 2x2"),
        "truncated PNG": (_truncated_png(), r"cannot be read"),
        "truncated JPEG": (png(size=(64, 64), fmt="JPEG")[:300], r"cannot be read"),
        "empty file": (b"", r"cannot be read"),
        "text": (b"hello", r"cannot be read"),
    }
    for label, (data, message) in cases.items():
        for source in (data, put(tmp_path / f"{label}.png", data)):
            with pytest.raises(VTCError, match=message):
                load_image(source)
    with pytest.raises(VTCError, match="no such file"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(VTCError, match="expected a file path or a PIL image, got int"):
        load_image(5)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1  # the only colour used is transparent: a viewer shows white
    assert (np.asarray(load_image(palette)) == 255).all()


# ----------------------------------------------------------------------------- one writer per store


def test_a_second_writer_on_a_shard_is_refused_and_other_shards_are_free(tmp_path):
    first = ResultStore(tmp_path, shard=0)
    with pytest.raises(VTCError, match=rf"being written by another run \(pid {os.getpid()} on host .*, started 20"):
        ResultStore(tmp_path, shard=0)
    ResultStore(tmp_path, shard=1).close()  # the other process of a data-parallel run
    first.append({"task": "t", "method": "m", "budget": "4", "sample_id": "1"})
    first.close()
    again = ResultStore(tmp_path, shard=0)  # released by close
    again.close()
    assert len(read_records(tmp_path)) == 1


def test_a_refusal_in_any_process_refuses_the_whole_run(tiny_pipe, tmp_path, monkeypatch):
    """Process 0 got its shard but process 1 was refused: process 0 must stop too, and let its shard go."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, "result store is busy (pid 1)"]))
    with pytest.raises(VTCError, match=r"busy \(pid 1\)") as refused:
        BenchRunner(tiny_pipe, tmp_path, process_index=0, num_processes=2)
    ResultStore(tmp_path, shard=0).close()  # not left locked, even while the error (and its frames) is still held
    assert refused.value


def test_concurrent_runs_leave_one_record_per_sample_and_a_killed_holder_does_not_block(tiny_dirs, tiny_pipe, tmp_path):
    """Two `vtc bench` on one --out: the one that gets the lock runs, the other is refused and names it.
    The holder is then killed with SIGKILL; its lock file stays, but the next run is not blocked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "vtc.cli", "bench", "--model", str(tiny_dirs[0]), "--clip", str(tiny_dirs[1]), "--tasks", "synthetic",
           "--methods", "none,random", "--budgets", "4", "--limit", "40", "--batch-size", "2", "--out", str(out)]
    runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    holder, deadline = None, time.time() + 240
    while holder is None and time.time() < deadline:
        try:
            holder = json.loads((out / "results.0.lock").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.02)
    try:
        assert holder in [run.pid for run in runs], "neither run took the store's lock"
        os.kill(holder, signal.SIGSTOP)  # hold it mid-run, so the other surely meets its lock
        winner, loser = sorted(runs, key=lambda p: p.pid != holder)
        _, err = loser.communicate(timeout=240)
        assert loser.returncode == 2, err[-2000:]
        assert f"pid {holder} on host" in " ".join(err.split()) and "Traceback" not in err
    finally:
        for run in runs:
            run.kill()  # SIGKILL: the holder dies holding the lock
            run.communicate()
    assert json.loads((out / "results.0.lock").read_text())["pid"] == holder  # the stale lock file is still there
    plan = make_plan(tiny_pipe, ["synthetic"], ["none", "random"], ["4"], 40)
    BenchRunner(tiny_pipe, out, batch_size=2).run(plan)  # not blocked; resumes what the killed run left
    lines = [line for line in (out / "results.0.jsonl").read_text().splitlines()]
    keys = [record_key(json.loads(line)) for line in lines]
    assert len(keys) == len(set(keys)) == 2 * 40  # one record per sample, none twice
