"""vtc's synthetic benchmark as an lmms-eval task that reads only local files (no hub).

``write_task(DIR, limit)`` writes the first ``limit`` questions of ``vtc bench``'s synthetic
task (the same samples, prompts and answers) into DIR:

  vtc_synthetic.yaml    the task (lmms-eval's json loader, this module's functions, metric accuracy)
  vtc_synthetic.jsonl   one question per line: id, question, answer, qtype, small, image (absolute path)
  images/ID.png         the scenes (PNG: the pixels vtc bench generates, unchanged)

then ``python -m lmms_eval --model vtc --tasks vtc_synthetic --include_path DIR`` evaluates it.
Accuracy is scored as ``vtc bench`` scores the task (the answer's first word, normalised, equals
the expected word), in percent.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

TASK_NAME = "vtc_synthetic"

_YAML = """\
# Written by `vtc lmms-task`: vtc's synthetic benchmark ({count} questions) for lmms-eval, read from local files.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function vtc.bench.lmms_task.doc_to_visual
doc_to_text: !function vtc.bench.lmms_task.doc_to_text
doc_to_target: answer
process_results: !function vtc.bench.lmms_task.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(out: Path, limit: int = 500) -> Path:
    """Write the task files under ``out`` (created if needed); returns the YAML's path."""
    from .tasks import load_task

    task = load_task("synthetic", limit=limit)
    out = Path(out).expanduser().resolve()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK_NAME}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for sample in task.samples:
            path = images / f"{sample.id}.png"
            sample.load_image().save(path)
            row = {"id": sample.id, "question": sample.question, "answer": sample.answer, "qtype": sample.meta["qtype"],
                   "small": sample.meta["small"], "image": str(path)}
            f.write(json.dumps(row) + "\n")
    config = out / f"{TASK_NAME}.yaml"
    config.write_text(_YAML.format(count=len(task.samples), task=TASK_NAME, data=json.dumps(str(data)),
                                   max_new_tokens=task.max_new_tokens), encoding="utf-8")
    return config


def doc_to_visual(doc: dict) -> list:
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    from ..demo.evaluate import normalise

    return {"accuracy": 100.0 * float(normalise(results[0]) == doc["answer"])}
