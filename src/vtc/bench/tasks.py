"""Benchmark tasks as declared data + prompt + metric, loaded from local files in their official formats.

``load_task("vqav2", path)`` reads the official question/annotation JSON and the COCO
images under ``path``; ``load_task("synthetic")`` needs no files.

Two kinds of bad data, two answers:
  * a wrong file (not UTF-8, not JSON, a JSON root or list of another type than the
    official format, missing columns, a POPE or MME question file with no usable line)
    raises ``VTCError`` naming the file and what was expected, before anything runs;
  * a malformed single record (a missing or mistyped field, an answer outside the
    options, a duplicate id, an unusable question) keeps its place as a sample with an
    ``error``: the runner records it as a failed sample and the rest still score.
Text files are read as UTF-8 (a byte-order mark is accepted); the official files are UTF-8.
A task with no samples at all is an error.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..methods.base import VTCError
from . import metrics

SHORT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's evaluation prompts
LETTER = "\nAnswer with the option's letter from the given choices directly."


@dataclass
class TaskSample:
    id: str
    question: str  # the prompt text that goes after the image
    answer: Any  # gold answer(s), as the metric expects
    image: Callable[[], Image.Image] | Path | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None  # the annotation could not be read

    def load_image(self) -> Image.Image:
        from ..io import load_image

        if self.image is None:
            raise VTCError(f"sample {self.id}: no image")
        return load_image(self.image) if isinstance(self.image, (str, Path)) else self.image()


@dataclass
class Task:
    name: str
    samples: list[TaskSample]
    score: Callable[[str, TaskSample], float]  # per-sample score in [0, 1]
    aggregate: Callable[[list[dict]], dict]  # official task metrics from stored records
    max_new_tokens: int = 16


def _mean_score(records: list[dict]) -> dict:
    ok = [r["score"] for r in records if r.get("error") is None]
    return {"score": round(100 * sum(ok) / len(ok), 2) if ok else float("nan"), "n": len(ok), "failed": len(records) - len(ok)}


# ----------------------------------------------------------------------------- reading files (wrong file -> VTCError)


JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}


def _kind(value) -> str:
    return JSON_KINDS.get(type(value), type(value).__name__)


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VTCError(f"cannot read {path}: {exc.strerror or exc}") from None
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        raise VTCError(f"{path} is not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} ({exc.reason}); "
                       "save it as UTF-8") from None


def _parse_json(text: str):
    """json.loads, with every way it can refuse text (bad syntax, huge integers, deep nesting) as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_json(path: Path, root: type, what: str):
    """The JSON document in ``path``; its root must be of type ``root`` (``what`` describes the expected file)."""
    text = _read_text(path)  # outside the try: its VTCError is a ValueError too
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as exc:
        raise VTCError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); expected {what}") from None
    except ValueError as exc:
        raise VTCError(f"{path} is not usable JSON ({exc}); expected {what}") from None
    if not isinstance(data, root):
        raise VTCError(f"{path}: expected {what}, but its root is a JSON {_kind(data)}")
    return data


def _read_json_list(path: Path, key: str, what: str) -> list:
    """The list under ``key`` of the JSON object in ``path``."""
    expected = f"{what}: a JSON object with a '{key}' array"
    data = _read_json(path, dict, expected)
    if key not in data:
        raise VTCError(f"{path}: expected {expected}, but it has no '{key}' (its keys: {', '.join(map(str, list(data)[:8])) or 'none'})")
    if not isinstance(data[key], list):
        raise VTCError(f"{path}: expected {expected}, but '{key}' is a JSON {_kind(data[key])}")
    return data[key]


def _find_one(root: Path, pattern: str) -> Path:
    hits = sorted(p for p in root.glob(pattern) if p.is_file())
    if not hits:
        raise VTCError(f"no file matching '{pattern}' under {root}")
    return hits[0]


def _image_index(root: Path) -> dict[str, Path]:
    """Image files under ``root`` by stem and by the trailing number of the stem (COCO_val2014_000000000042 -> 42)."""
    index = {}
    for path in root.rglob("*"):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            index.setdefault(path.stem, path)
            digits = re.search(r"(?<!\d)(\d{1,18})$", path.stem, re.ASCII)
            if digits:
                index.setdefault(str(int(digits.group(1))), path)
    return index


def _image_for(index: dict[str, Path], root: Path, key) -> Path:
    key = str(key)
    number = str(int(key)) if re.fullmatch(r"\d{1,18}", key, re.ASCII) else key  # not '²' or 5000 digits: int() refuses those
    return index.get(key) or index.get(number) or root / f"{key}.jpg"  # missing -> load error


# ----------------------------------------------------------------------------- reading records (malformed -> recorded failure)


class Malformed(ValueError):
    """One record cannot be used; it becomes a sample with an ``error``, recorded as a failure."""


def _field(row, key: str):
    if not isinstance(row, dict):
        raise Malformed(f"expected a JSON object, got a {_kind(row)}")
    if key not in row:
        raise Malformed(f"no '{key}'")
    return row[key]


def _text(row, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise Malformed(f"'{key}' must be a string, got a {_kind(value)}")
    return value


def _question(row, key: str = "question") -> str:
    value = _text(row, key)
    if not value.strip():
        raise Malformed(f"'{key}' is empty")
    return value


def _texts(row, key: str) -> list[str]:
    """A non-empty list of strings."""
    value = _field(row, key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise Malformed(f"'{key}' must be a non-empty array of strings, got {_kind(value)} {str(value)[:60]}")
    return value


def _ident(row, key: str) -> str:
    """An id field: a string or an integer."""
    value = _field(row, key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Malformed(f"'{key}' must be a string or an integer, got a {_kind(value)}")
    return str(value)


def _id_or(row, key: str, fallback: str) -> str:
    """The record's id for the store, or a positional one when the id itself is unusable."""
    try:
        return _ident(row, key)
    except Malformed:
        return fallback


def _failed(sample_id: str, error: str, meta: dict | None = None) -> TaskSample:
    return TaskSample(sample_id, "", None, meta=meta or {}, error=error)


def _yes_no(value: str, what: str) -> str:
    label = value.strip().lower()
    if label not in ("yes", "no"):
        raise Malformed(f"{what} must be yes or no, got {value[:40]!r}")
    return label


# ----------------------------------------------------------------------------- synthetic


def synthetic(path: Path | None = None, limit: int | None = None) -> Task:
    from ..demo.evaluate import normalise
    from ..demo.scenes import make_sample, split_seeds

    seeds = split_seeds("test")
    count = limit or 500

    def sample(i: int) -> TaskSample:
        s = make_sample(seeds[i])
        return TaskSample(str(seeds[i]), s.question, s.answer, (lambda seed=seeds[i]: make_sample(seed).image), {"qtype": s.qtype, "small": s.small_target})

    return Task("synthetic", [sample(i) for i in range(count)], lambda p, s: float(normalise(p) == s.answer), synthetic_aggregate, 3)


def synthetic_aggregate(records: list[dict]) -> dict:
    out = _mean_score(records)
    small = [r["score"] for r in records if r.get("error") is None and r["meta"].get("small")]
    out["small_target"] = round(100 * sum(small) / len(small), 2) if small else float("nan")
    return out


# ----------------------------------------------------------------------------- VQA family


def _by_id(rows: list, key: str) -> dict[str, Any]:
    """Records by their id; a record without a usable id is left out (its question then fails as unannotated)."""
    out: dict[str, Any] = {}
    for row in rows:
        try:
            out.setdefault(_ident(row, key), row)
        except Malformed:
            pass
    return out


def vqav2(path: Path, limit: int | None = None) -> Task:
    qfile, afile = _find_one(path, "*questions*.json"), _find_one(path, "*annotations*.json")
    questions = _read_json_list(qfile, "questions", "the VQAv2 questions file")
    annotations = _by_id(_read_json_list(afile, "annotations", "the VQAv2 annotations file"), "question_id")
    index = _image_index(path)
    samples = []
    for n, q in enumerate(questions[:limit]):
        qid = _id_or(q, "question_id", f"#{n + 1}")
        try:
            prompt, image = _question(q) + SHORT, _image_for(index, path, _ident(q, "image_id"))
            if _ident(q, "question_id") not in annotations:
                raise Malformed(f"no annotation for it in {afile.name}")
            answers = _field(annotations[qid], "answers")
            if not isinstance(answers, list) or not answers:
                raise Malformed(f"'answers' must be a non-empty array of {{'answer': ...}} objects, got a {_kind(answers)}")
            answers = [_text(a, "answer") for a in answers]
            samples.append(TaskSample(qid, prompt, answers, image))
        except Malformed as exc:
            samples.append(_failed(qid, f"{qfile.name}: question {qid}: {exc}"))
    return Task("vqav2", samples, lambda p, s: metrics.vqa_accuracy(p, s.answer), _mean_score)


def textvqa(path: Path, limit: int | None = None) -> Task:
    dfile = _find_one(path, "*TextVQA*.json")
    data = _read_json_list(dfile, "data", "a TextVQA annotation file")
    index = _image_index(path)
    samples = []
    for n, row in enumerate(data[:limit]):
        qid = _id_or(row, "question_id", f"#{n + 1}")
        try:
            _ident(row, "question_id")  # a positional id would do, but a mistyped one says the record is off
            samples.append(TaskSample(qid, _question(row) + SHORT, _texts(row, "answers"), _image_for(index, path, _ident(row, "image_id"))))
        except Malformed as exc:
            samples.append(_failed(qid, f"{dfile.name}: question {qid}: {exc}"))
    return Task("textvqa", samples, lambda p, s: metrics.vqa_accuracy(p, s.answer), _mean_score)


def gqa(path: Path, limit: int | None = None) -> Task:
    qfile = _find_one(path, "*questions*.json")
    data = _read_json(qfile, dict, "GQA questions: a JSON object of question objects by question id")
    index = _image_index(path)
    samples = []
    for qid, row in list(data.items())[:limit]:
        try:
            samples.append(TaskSample(qid, _question(row) + SHORT, _text(row, "answer"), _image_for(index, path, _ident(row, "imageId"))))
        except Malformed as exc:
            samples.append(_failed(qid, f"{qfile.name}: question {qid}: {exc}"))
    return Task("gqa", samples, lambda p, s: metrics.exact_match(p, s.answer), _mean_score)


# ----------------------------------------------------------------------------- POPE, MME


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines (split on newlines only, as JSON lines are)."""
    return [(n, line.rstrip("\r")) for n, line in enumerate(_read_text(path).split("\n"), 1) if line.strip()]


def _none_usable(path: Path, samples: list[TaskSample], expected: str) -> None:
    """A question file none of whose lines is a record is a wrong file, not a file of failed samples."""
    if samples and all(s.error for s in samples):
        raise VTCError(f"{path}: expected {expected}; none of its {len(samples)} lines is one (first: {samples[0].error})")


def _pope_file(split_file: Path, split: str, index: dict[str, Path], root: Path) -> list[TaskSample]:
    samples = []
    for n, line in _lines(split_file):
        meta = {"split": split}
        try:
            try:
                row = _parse_json(line)
            except ValueError as exc:
                raise Malformed(f"not JSON: {exc}") from None
            label = _yes_no(_text(row, "label"), "'label'")
            image = _image_for(index, root, Path(_text(row, "image")).stem)
            samples.append(TaskSample(f"{split}/{_ident(row, 'question_id')}", _question(row, "text") + SHORT, label, image, meta))
        except Malformed as exc:
            samples.append(_failed(f"{split}/line{n}", f"{split_file.name} line {n}: malformed ({exc})", meta))
    _none_usable(split_file, samples, "POPE questions, one JSON object per line with question_id, image, text and label")
    return samples


def pope(path: Path, limit: int | None = None) -> Task:
    index = _image_index(path)
    files = sorted(p for p in path.glob("*pope*.json*") if p.is_file())
    if not files:
        raise VTCError(f"no POPE split files (*pope*.json) under {path}")
    samples = []
    for split_file in files:
        samples += _pope_file(split_file, re.sub(r"^.*pope_|\.jsonl?$", "", split_file.name), index, path)
    return Task("pope", samples[:limit], lambda p, s: float(metrics.yes_no(p) == s.answer), pope_aggregate, 8)


def pope_aggregate(records: list[dict]) -> dict:
    """Per split accuracy / precision / recall / F1 / yes-ratio; the headline score is the mean F1 over splits."""
    by_split: dict[str, list] = {}
    for r in records:
        if r.get("error") is None:
            by_split.setdefault(r["meta"]["split"], []).append((r["prediction"], r["answer"]))
    out = {split: metrics.pope_scores(pairs) for split, pairs in sorted(by_split.items())}
    f1 = [v["f1"] for v in out.values()]
    return {"score": round(sum(f1) / len(f1), 2) if f1 else float("nan"), "splits": out, "failed": sum(r.get("error") is not None for r in records)}


def _mme_file(txt: Path, task_dir: Path, images: dict[str, Path]) -> list[TaskSample]:
    stem = txt.stem
    image = images.get(stem, task_dir / f"{stem}.jpg")  # missing -> load error
    meta = {"subtask": task_dir.name, "image": stem}
    samples = []
    for n, line in _lines(txt):
        sid = f"{task_dir.name}/{stem}/{n - 1}"
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or parts[1].strip().lower() not in ("yes", "no"):
            samples.append(_failed(sid, f"{txt}: line {n} is not 'question<TAB>Yes|No'", dict(meta)))
            continue
        samples.append(TaskSample(sid, parts[0].strip(), parts[1].strip().lower(), image, dict(meta)))
    _none_usable(txt, samples, "MME questions, one 'question<TAB>Yes|No' per line")
    return samples


def mme(path: Path, limit: int | None = None) -> Task:
    samples = []
    for task_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        images: dict[str, Path] = {}
        for p in sorted(task_dir.rglob("*")):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                images.setdefault(p.stem, p)
        for txt in sorted(task_dir.rglob("*.txt")):
            samples += _mme_file(txt, task_dir, images)
    if not samples:
        raise VTCError(f"no MME subtask folders with question files under {path}")
    return Task("mme", samples[:limit], lambda p, s: float(metrics.mme_label(p) == s.answer), mme_aggregate, 8)


def mme_aggregate(records: list[dict]) -> dict:
    """Perception and cognition sums of acc + acc+ per subtask; the headline score is their total."""
    rows = [(r["meta"]["subtask"], r["meta"]["image"], r["prediction"], r["answer"]) for r in records if r.get("error") is None]
    out = metrics.mme_scores(rows)
    return {"score": round(out["perception"] + out["cognition"], 2), **out, "failed": sum(r.get("error") is not None for r in records)}


# ----------------------------------------------------------------------------- multiple choice


def _options_prompt(question: str, options: list[str], hint: str | None) -> str:
    lines = ([f"Context: {hint}"] if hint else []) + [question] + [f"{chr(65 + i)}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + LETTER


def _option_index(value, count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise Malformed(f"'answer' must be an option number from 0 to {count - 1}, got {str(value)[:40]}")
    return value


def _scienceqa_sample(pid: str, row: dict, folders: dict[str, list[Path]], root: Path) -> TaskSample:
    choices = _texts(row, "choices")
    if len(choices) > 26:
        raise Malformed(f"{len(choices)} choices; at most 26 can be lettered")
    answer = chr(65 + _option_index(_field(row, "answer"), len(choices)))
    hint = row.get("hint")
    if hint is not None and not isinstance(hint, str):
        raise Malformed(f"'hint' must be a string, got a {_kind(hint)}")
    name = _text(row, "image")
    image = next((d / name for d in folders.get(pid, []) if (d / name).is_file()), root / "test" / pid / name)
    return TaskSample(pid, _options_prompt(_question(row), choices, hint or None), answer, image, {"letters": "".join(chr(65 + i) for i in range(len(choices)))})


def scienceqa_img(path: Path, limit: int | None = None) -> Task:
    pfile, sfile = _find_one(path, "problems.json"), _find_one(path, "pid_splits.json")
    problems = _read_json(pfile, dict, "ScienceQA's problems.json: a JSON object of problem objects by problem id")
    test = _read_json_list(sfile, "test", "ScienceQA's pid_splits.json")
    folders: dict[str, list[Path]] = {}
    for d in sorted(p for p in path.rglob("*") if p.is_dir()):
        folders.setdefault(d.name, []).append(d)
    samples = []
    for n, pid in enumerate(test):
        pid = str(pid) if isinstance(pid, (str, int)) and not isinstance(pid, bool) else f"#{n + 1}"
        row = problems.get(pid)
        if isinstance(row, dict) and not row.get("image"):
            continue  # the IMG subset: test questions with an image
        try:
            if row is None:
                raise Malformed(f"not in {pfile.name}" if not pid.startswith("#") else f"test entry {n + 1} is not a problem id")
            samples.append(_scienceqa_sample(pid, row, folders, path))
        except Malformed as exc:
            samples.append(_failed(pid, f"{pfile.name}: problem {pid}: {exc}"))
    return Task("scienceqa_img", samples[:limit], lambda p, s: float(metrics.option_letter(p, s.meta["letters"]) == s.answer), _mean_score, 4)


MMBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "image")


def _present(value) -> bool:
    return isinstance(value, str) and value not in ("", "nan")


def _mmbench_sample(row: dict, tsv: Path, n: int) -> TaskSample:
    from ..io import load_image

    options = [row[k] for k in "ABCD" if _present(row.get(k))]
    letters = "ABCD"[: len(options)]
    try:
        index = int(row["index"])
    except (TypeError, ValueError):
        raise Malformed(f"'index' must be an integer, got {str(row['index'])[:40]!r}") from None
    answer = (row["answer"] or "").strip().upper()
    if len(answer) != 1 or answer not in letters:
        raise Malformed(f"'answer' must be one of the option letters {', '.join(letters) or '(none given)'}, got {answer[:40]!r}")
    try:
        blob = base64.b64decode(row["image"] or "")
    except (binascii.Error, ValueError) as exc:
        raise Malformed(f"'image' is not base64 ({exc})") from None
    if not blob:
        raise Malformed("'image' is empty")
    if not _present(row["question"]):
        raise Malformed("'question' is empty")
    hint = row.get("hint") if _present(row.get("hint")) else None
    image = lambda: load_image(blob, name=f"{tsv.name} row {n} image")  # noqa: E731
    return TaskSample(str(index), _options_prompt(row["question"], options, hint), answer, image, {"index": index, "letters": letters})


def mmbench(path: Path, limit: int | None = None) -> Task:
    tsv = _find_one(path, "*.tsv")
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(io.StringIO(_read_text(tsv), newline=""), delimiter="\t")
    missing = [c for c in MMBENCH_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise VTCError(f"{tsv}: expected MMBench's tab-separated columns index, question, hint, A, B, C, D, answer, image; "
                       f"missing: {', '.join(missing)}")
    samples = []
    try:
        for n, row in enumerate(reader, 1):
            try:
                samples.append(_mmbench_sample(row, tsv, n))
            except Malformed as exc:
                samples.append(_failed(f"row{n}", f"{tsv.name} row {n}: malformed ({exc})"))
    except csv.Error as exc:
        raise VTCError(f"{tsv}: not a readable TSV at line {reader.line_num}: {exc}") from None
    return Task("mmbench", samples[:limit], lambda p, s: float(metrics.option_letter(p, s.meta["letters"]) == s.answer), mmbench_aggregate, 4)


def mmbench_aggregate(records: list[dict]) -> dict:
    """Accuracy; CircularEval when the TSV holds the circular passes (indices >= 1e6)."""
    rows = [(r["meta"]["index"], r["score"] == 1.0) for r in records if r.get("error") is None]
    circular = any(i >= 1_000_000 for i, _ in rows)
    out = _mean_score(records)
    if circular:
        out["score"] = round(metrics.circular_accuracy(rows), 2)
    out["circular"] = circular
    return out


AGGREGATES: dict[str, Callable[[list[dict]], dict]] = {
    "synthetic": synthetic_aggregate, "vqav2": _mean_score, "textvqa": _mean_score, "gqa": _mean_score,
    "pope": pope_aggregate, "mme": mme_aggregate, "scienceqa_img": _mean_score, "mmbench": mmbench_aggregate,
}

TASKS: dict[str, Callable[..., Task]] = {
    "synthetic": synthetic, "vqav2": vqav2, "textvqa": textvqa, "gqa": gqa, "pope": pope, "mme": mme,
    "scienceqa_img": scienceqa_img, "mmbench": mmbench,
}


def _check_samples(task: Task) -> None:
    """Per-sample checks every loader shares: unique ids (the store keys records by them) and usable questions."""
    from ..io import check_question

    seen: set[str] = set()
    for sample in task.samples:
        if sample.id in seen:
            copy = 2
            while f"{sample.id}~{copy}" in seen:
                copy += 1
            sample.error = sample.error or f"duplicate id {sample.id}: only its first sample is scored"
            sample.id = f"{sample.id}~{copy}"
        seen.add(sample.id)
        if sample.error is None:
            try:
                check_question(sample.question, sample.id)
            except VTCError as exc:
                sample.error = str(exc)


def load_task(spec: str, limit: int | None = None) -> Task:
    """``name`` or ``name=PATH`` (every task except synthetic reads its official files under PATH).

    Raises VTCError for a wrong file (see the module docstring), a task with no samples, and a task
    none of whose samples is usable.
    """
    name, _, path = spec.partition("=")
    name = name.strip()
    if name not in TASKS:
        raise VTCError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    if name == "synthetic":
        task = synthetic(limit=limit)
    else:
        if not path:
            raise VTCError(f"task '{name}' reads local files: give it as {name}=PATH")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise VTCError(f"task '{name}': data directory {root} does not exist")
        task = TASKS[name](root, limit)
    where = f" under {path}" if path else ""
    if not task.samples:
        raise VTCError(f"task '{name}'{where} has no samples: its files hold no questions")
    _check_samples(task)
    if all(s.error for s in task.samples):
        raise VTCError(f"task '{name}'{where}: none of its {len(task.samples)} samples is usable (first: {task.samples[0].error})")
    return task
