"""Benchmark tasks as declared data + prompt + metric, loaded from local files in their official formats.

``load_task("vqav2", path)`` reads the official question/annotation JSON and the COCO
images under ``path``; ``load_task("synthetic")`` needs no files. A sample whose
annotation is malformed keeps its place with an ``error``: the runner records it as a
failed sample instead of crashing the run.
"""

from __future__ import annotations

import base64
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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VTCError(f"cannot read annotation file {path}: {exc}") from None


def _find_one(root: Path, pattern: str) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise VTCError(f"no file matching '{pattern}' under {root}")
    return hits[0]


def _image_index(root: Path) -> dict[str, Path]:
    """Image files under ``root`` by stem and by the trailing number of the stem (COCO_val2014_000000000042 -> 42)."""
    index = {}
    for path in root.rglob("*"):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            index.setdefault(path.stem, path)
            digits = re.search(r"(\d+)$", path.stem)
            if digits:
                index.setdefault(str(int(digits.group(1))), path)
    return index


def _image_for(index: dict[str, Path], root: Path, key) -> Path:
    key = str(key)
    return index.get(key) or index.get(str(int(key)) if key.isdigit() else key) or root / f"{key}.jpg"  # missing -> load error


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


def vqav2(path: Path, limit: int | None = None) -> Task:
    questions = _read_json(_find_one(path, "*questions*.json")).get("questions", [])
    annotations = {a.get("question_id"): a for a in _read_json(_find_one(path, "*annotations*.json")).get("annotations", [])}
    index = _image_index(path)
    samples = []
    for q in questions[:limit]:
        qid = q.get("question_id")
        ann = annotations.get(qid)
        try:
            answers = [a["answer"] for a in ann["answers"]]
            samples.append(TaskSample(str(qid), q["question"] + SHORT, answers, _image_for(index, path, q["image_id"])))
        except (KeyError, TypeError):
            samples.append(TaskSample(str(qid), "", None, error=f"question {qid}: missing question, image_id or answers"))
    return Task("vqav2", samples, lambda p, s: metrics.vqa_accuracy(p, s.answer), _mean_score)


def textvqa(path: Path, limit: int | None = None) -> Task:
    data = _read_json(_find_one(path, "*TextVQA*.json")).get("data", [])
    index = _image_index(path)
    samples = []
    for row in data[:limit]:
        qid = row.get("question_id")
        try:
            samples.append(TaskSample(str(qid), row["question"] + SHORT, list(row["answers"]), _image_for(index, path, row["image_id"])))
        except (KeyError, TypeError):
            samples.append(TaskSample(str(qid), "", None, error=f"question {qid}: missing question, image_id or answers"))
    return Task("textvqa", samples, lambda p, s: metrics.vqa_accuracy(p, s.answer), _mean_score)


def gqa(path: Path, limit: int | None = None) -> Task:
    data = _read_json(_find_one(path, "*questions*.json"))
    index = _image_index(path)
    samples = []
    for qid, row in list(data.items())[:limit]:
        try:
            samples.append(TaskSample(str(qid), row["question"] + SHORT, row["answer"], _image_for(index, path, row["imageId"])))
        except (KeyError, TypeError):
            samples.append(TaskSample(str(qid), "", None, error=f"question {qid}: missing question, imageId or answer"))
    return Task("gqa", samples, lambda p, s: metrics.exact_match(p, s.answer), _mean_score)


# ----------------------------------------------------------------------------- POPE, MME


def pope(path: Path, limit: int | None = None) -> Task:
    index = _image_index(path)
    samples = []
    for split_file in sorted(path.glob("*pope*.json*")):
        split = re.sub(r"^.*pope_|\.jsonl?$", "", split_file.name)
        for n, line in enumerate(split_file.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                label = row["label"].strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"label {row['label']!r}")
                samples.append(TaskSample(f"{split}/{row['question_id']}", row["text"] + SHORT, label, _image_for(index, path, Path(row["image"]).stem), {"split": split}))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                samples.append(TaskSample(f"{split}/line{n + 1}", "", None, meta={"split": split}, error=f"{split_file.name} line {n + 1}: malformed ({exc})"))
    if not samples:
        raise VTCError(f"no POPE split files (*pope*.json) under {path}")
    samples = samples[:limit]

    return Task("pope", samples, lambda p, s: float(metrics.yes_no(p) == s.answer), pope_aggregate, 8)


def pope_aggregate(records: list[dict]) -> dict:
    """Per split accuracy / precision / recall / F1 / yes-ratio; the headline score is the mean F1 over splits."""
    by_split: dict[str, list] = {}
    for r in records:
        if r.get("error") is None:
            by_split.setdefault(r["meta"]["split"], []).append((r["prediction"], r["answer"]))
    out = {split: metrics.pope_scores(pairs) for split, pairs in sorted(by_split.items())}
    f1 = [v["f1"] for v in out.values()]
    return {"score": round(sum(f1) / len(f1), 2) if f1 else float("nan"), "splits": out, "failed": sum(r.get("error") is not None for r in records)}


def mme(path: Path, limit: int | None = None) -> Task:
    samples = []
    for task_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for txt in sorted(task_dir.rglob("*.txt")):
            stem = txt.stem
            image = next((p for p in task_dir.rglob(f"{stem}.*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")), task_dir / f"{stem}.jpg")
            for n, line in enumerate(txt.read_text().splitlines()):
                if not line.strip():
                    continue
                parts = line.split("\t")
                sid = f"{task_dir.name}/{stem}/{n}"
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    samples.append(TaskSample(sid, "", None, meta={"subtask": task_dir.name, "image": stem}, error=f"{txt}: line {n + 1} is not 'question<TAB>Yes|No'"))
                    continue
                samples.append(TaskSample(sid, parts[0].strip(), parts[1].strip().lower(), image, {"subtask": task_dir.name, "image": stem}))
    if not samples:
        raise VTCError(f"no MME subtask folders with question files under {path}")

    return Task("mme", samples[:limit], lambda p, s: float(metrics.yes_no(p) == s.answer), mme_aggregate, 8)


def mme_aggregate(records: list[dict]) -> dict:
    """Perception and cognition sums of acc + acc+ per subtask; the headline score is their total."""
    rows = [(r["meta"]["subtask"], r["meta"]["image"], r["prediction"], r["answer"]) for r in records if r.get("error") is None]
    out = metrics.mme_scores(rows)
    return {"score": round(out["perception"] + out["cognition"], 2), **out, "failed": sum(r.get("error") is not None for r in records)}


# ----------------------------------------------------------------------------- multiple choice


def _options_prompt(question: str, options: list[str], hint: str | None) -> str:
    lines = ([f"Context: {hint}"] if hint else []) + [question] + [f"{chr(65 + i)}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + LETTER


def scienceqa_img(path: Path, limit: int | None = None) -> Task:
    problems = _read_json(_find_one(path, "problems.json"))
    splits = _read_json(_find_one(path, "pid_splits.json"))
    samples = []
    for pid in splits.get("test", []):
        row = problems.get(pid)
        if not row or not row.get("image"):
            continue  # the IMG subset: test questions with an image
        try:
            answer = chr(65 + int(row["answer"]))
            prompt = _options_prompt(row["question"], list(row["choices"]), row.get("hint") or None)
            image = next(iter(sorted(path.glob(f"**/{pid}/{row['image']}"))), path / "test" / pid / row["image"])
            samples.append(TaskSample(pid, prompt, answer, image, {"letters": "".join(chr(65 + i) for i in range(len(row["choices"])))}))
        except (KeyError, TypeError, ValueError):
            samples.append(TaskSample(pid, "", None, error=f"problem {pid}: missing question, choices or answer"))
    samples = samples[:limit]
    return Task("scienceqa_img", samples, lambda p, s: float(metrics.option_letter(p, s.meta["letters"]) == s.answer), _mean_score, 4)


def mmbench(path: Path, limit: int | None = None) -> Task:
    tsv = _find_one(path, "*.tsv")
    csv.field_size_limit(1 << 30)
    samples = []
    with open(tsv, newline="") as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t")):
            try:
                options = [row[k] for k in "ABCD" if row.get(k) not in (None, "", "nan")]
                index = int(row["index"])
                blob = base64.b64decode(row["image"])
                prompt = _options_prompt(row["question"], options, row.get("hint") if row.get("hint") not in (None, "", "nan") else None)
                image = lambda blob=blob: Image.open(io.BytesIO(blob)).convert("RGB")  # noqa: E731
                samples.append(TaskSample(str(index), prompt, row["answer"].strip().upper(), image, {"index": index, "letters": "ABCD"[: len(options)]}))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                samples.append(TaskSample(f"row{n + 1}", "", None, error=f"{tsv.name} row {n + 1}: malformed ({exc})"))
    samples = samples[:limit]

    return Task("mmbench", samples, lambda p, s: float(metrics.option_letter(p, s.meta["letters"]) == s.answer), mmbench_aggregate, 4)


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


def load_task(spec: str, limit: int | None = None) -> Task:
    """``name`` or ``name=PATH`` (every task except synthetic reads its official files under PATH)."""
    name, _, path = spec.partition("=")
    name = name.strip()
    if name not in TASKS:
        raise VTCError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    if name == "synthetic":
        return synthetic(limit=limit)
    if not path:
        raise VTCError(f"task '{name}' reads local files: give it as {name}=PATH")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise VTCError(f"task '{name}': data directory {root} does not exist")
    return TASKS[name](root, limit)
