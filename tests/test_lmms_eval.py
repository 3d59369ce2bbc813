"""The lmms-eval bridge: --model_args, batching, the offline synthetic task, the end-to-end run, a broken torchvision.

The end-to-end test needs lmms-eval (the ``lmms`` extra): it is skipped without it, unless
VTC_REQUIRE_LMMS=1 (CI's second environment), where a missing lmms-eval is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from vtc.bench.lmms import BridgeOptions, answer_requests, bridge_options, cut_at_stops, merge_model_args
from vtc.methods import VTCError

SRC = Path(__file__).resolve().parents[1] / "src"


# ----------------------------------------------------------------------------- --model_args


def test_model_args_carry_every_vtc_option_and_chains():
    # as lmms-eval hands them over: simple_parse_args_string turns numbers and true/false into Python values
    opts = bridge_options(pretrained="/m", clip="/c", method="recoverable>fastv", budget="auto>64", dtype="float16",
                          device="cpu", batch_size=4, per_tile=True, compat="original")
    assert opts == BridgeOptions(Path("/m"), Path("/c"), "recoverable>fastv", "auto>64", "float16", "cpu", 4, True, {"compat": "original"})
    plain = bridge_options(method="fastervlm", budget=20)
    assert (plain.pretrained, plain.clip, plain.budget, plain.batch_size, plain.per_tile) == (None, None, "20", 1, False)


@pytest.mark.parametrize(
    "args, message",
    [
        ({"method": "nosuch"}, "unknown method 'nosuch'"),
        ({"method": "fastervlm", "bogus": 1}, r"does not take options \['bogus'\]"),
        ({"method": "recoverable>fastv", "budget": "auto"}, "give two budgets"),
        ({"method": "fastervlm", "budget": "lots"}, "lots"),
        ({"batch_size": "auto"}, "batch_size 'auto'"),
        ({"batch_size": 0}, "at least 1"),
        ({"per_tile": "maybe"}, "per_tile='maybe'"),
        ({"text_source": "siglip"}, "text_source must be 'clip' or 'llm'"),
    ],
)
def test_bad_model_args_fail_before_any_model_loads(args, message):
    with pytest.raises(VTCError, match=message):
        bridge_options(**args)


def test_batch_size_from_model_args_wins_over_lmms_evals_default_and_a_conflict_is_refused():
    assert merge_model_args({"batch_size": 4}, {"batch_size": 1, "device": None, "max_batch_size": None}) == {"batch_size": 4}
    assert merge_model_args({}, {"batch_size": "8", "device": "cpu"}) == {"batch_size": "8", "device": "cpu"}
    assert merge_model_args({"batch_size": 8}, {"batch_size": "8"}) == {"batch_size": 8}
    with pytest.raises(VTCError, match="batch_size is given twice"):
        merge_model_args({"batch_size": 4}, {"batch_size": "8"})
    with pytest.raises(VTCError, match="device is given twice"):
        merge_model_args({"device": "cpu"}, {"device": "cuda"})


# ----------------------------------------------------------------------------- batching


def test_batched_requests_answer_as_one_at_a_time_in_request_order(tiny_pipe, monkeypatch):
    questions = ["what color ?", "what is the shape of the thing on the left ?", "how many ?", "is it red or is it blue ?", "where ?"]
    images = [random_image(10 + i) for i in range(5)]
    gens = [{"max_new_tokens": 3}, {"max_new_tokens": 5, "until": ["\n\n"]}, {"max_new_tokens": 3}, {"max_new_tokens": 3},
            {"max_new_tokens": 5, "until": ["\n\n"]}]
    # the independent reference: each request alone, straight through the pipeline
    alone = [tiny_pipe([im], [q], method="fastervlm", budget="4", max_new_tokens=g["max_new_tokens"])[0].text
             for im, q, g in zip(images, questions, gens)]
    calls = []
    pipe_call = type(tiny_pipe).__call__
    monkeypatch.setattr(type(tiny_pipe), "__call__", lambda self, ims, qs, **kw: calls.append(len(ims)) or pipe_call(self, ims, qs, **kw))
    items = [(q, g, (lambda im=im: [im])) for q, g, im in zip(questions, gens, images)]  # images loaded lazily
    batched = answer_requests(tiny_pipe, BridgeOptions(method="fastervlm", budget="4", batch_size=2), items)
    assert batched == alone
    assert calls == [2, 1, 2]  # max_new_tokens=3: requests 0, 2 | 3; max_new_tokens=5: requests 1, 4


def test_the_bridge_loads_a_tiled_family_from_model_args_and_splits_budgets_per_tile(tmp_path, tiny_dirs):
    from vtc.bench.lmms import load_pipeline
    from vtc.testing import save_tiny_llava_next

    model = save_tiny_llava_next(tmp_path / "llava_next", text_layers=2)
    options = bridge_options(pretrained=str(model), clip=str(tiny_dirs[1]), method="fastervlm", budget=12, per_tile="true", batch_size=3)
    pipe = load_pipeline(options)
    assert pipe.adapter.tiled
    images = [random_image(1, (40, 52)), random_image(2, (90, 30)), random_image(3, (64, 64))]
    questions = ["what is the color ?", "how many circle ?", "describe the picture ."]
    alone = [pipe([im], [q], method="fastervlm", budget=12, per_tile=True, max_new_tokens=4)[0].text for im, q in zip(images, questions)]
    items = [(q, {"max_new_tokens": 4}, [im]) for q, im in zip(questions, images)]
    assert answer_requests(pipe, options, items) == alone


def test_answers_stop_at_the_tasks_stop_strings_and_sampling_or_extra_images_are_refused(tiny_pipe):
    assert cut_at_stops("yes\n\nno", ["\n\n"]) == "yes"
    assert cut_at_stops("red. blue", [".", "\n\n"]) == "red"
    assert cut_at_stops("red", []) == "red"
    image = Image.new("RGB", (40, 40), (10, 200, 10))
    options = BridgeOptions(method="fastervlm", budget="4")
    for gen in ({"do_sample": True}, {"temperature": 0.7}, {"num_beams": 3}):
        with pytest.raises(VTCError, match="decodes greedily"):
            answer_requests(tiny_pipe, options, [("q", gen, [image])])
    with pytest.raises(VTCError, match="request 1: .* exactly one image, got 2"):
        answer_requests(tiny_pipe, options, [("q", {}, [image]), ("q", {}, [image, image])])


def test_register_names_the_extra_when_lmms_eval_is_missing():
    from vtc.bench.lmms import register

    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        with pytest.raises(VTCError, match=r"visual-token-compression\[lmms\]"):
            register()
    else:
        from lmms_eval.models import get_model

        assert register() is get_model("vtc")


# ----------------------------------------------------------------------------- the offline task


def test_the_lmms_task_holds_vtc_benchs_synthetic_samples_with_their_pixels(tmp_path):
    from vtc.bench.lmms_task import doc_to_text, doc_to_visual, process_results, write_task
    from vtc.demo.scenes import make_sample, split_seeds

    config = write_task(tmp_path / "task", limit=3)
    rows = [json.loads(line) for line in (tmp_path / "task" / "vtc_synthetic.jsonl").read_text().splitlines()]
    seeds = split_seeds("test")[:3]
    assert [r["id"] for r in rows] == [str(s) for s in seeds]
    for row, seed in zip(rows, seeds):
        scene = make_sample(seed)
        assert (doc_to_text(row), row["answer"]) == (scene.question, scene.answer)
        [image] = doc_to_visual(row)
        assert np.array_equal(np.asarray(image), np.asarray(scene.image.convert("RGB")))
    text = config.read_text()
    assert "dataset_path: json" in text and "max_new_tokens: 3" in text and json.dumps(str(tmp_path / "task" / "vtc_synthetic.jsonl")) in text
    # vtc bench's synthetic scoring: the first word, lower-cased, trailing punctuation dropped
    assert process_results({"answer": "circle"}, ["Circle."]) == process_results({"answer": "circle"}, [" circle big"]) == {"accuracy": 100.0}
    assert process_results({"answer": "circle"}, ["circle. big"]) == {"accuracy": 0.0}
    assert process_results({"answer": "circle"}, ["square"]) == {"accuracy": 0.0}


def test_vtc_lmms_task_writes_the_task_and_prints_the_command(tmp_path):
    from typer.testing import CliRunner

    from vtc.cli import app

    result = CliRunner().invoke(app, ["lmms-task", str(tmp_path / "t"), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "t" / "vtc_synthetic.jsonl").read_text().splitlines()) == 2
    assert f"--tasks vtc_synthetic --include_path {tmp_path / 't'}" in " ".join(result.output.split())
    (tmp_path / "file").write_text("x")
    refused = CliRunner().invoke(app, ["lmms-task", str(tmp_path / "file")])
    assert refused.exit_code == 2 and "is not a directory" in refused.output


# ----------------------------------------------------------------------------- end to end


def _lmms_eval_or_skip():
    try:
        import lmms_eval  # noqa: F401
    except ImportError as exc:
        if os.environ.get("VTC_REQUIRE_LMMS") == "1":
            pytest.fail(f"VTC_REQUIRE_LMMS=1 but lmms-eval does not import: {exc}")
        pytest.skip("lmms-eval is not installed (the lmms extra)")


def test_lmms_eval_reports_vtc_benchs_accuracy_on_the_same_samples(tmp_path):
    _lmms_eval_or_skip()
    from vtc.bench.lmms_task import write_task
    from vtc.bench.report import summarise
    from vtc.bench.runner import BenchRunner, make_plan
    from vtc.bench.store import read_records
    from vtc.bench.lmms import BridgeOptions, load_pipeline

    limit, method, budget = 24, "recoverable", "20"
    task_dir = write_task(tmp_path / "task", limit=limit).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "lmms_eval", "--model", "vtc", "--model_args", f"method={method},budget={budget}",
               "--tasks", "vtc_synthetic", "--include_path", str(task_dir), "--limit", str(limit), "--batch_size", "5",
               "--output_path", str(tmp_path / "lmms"), "--log_samples"]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results_file] = (tmp_path / "lmms").rglob("*_results.json")  # lmms-eval exits 0 after some errors: read its output
    lmms_accuracy = json.loads(results_file.read_text())["results"]["vtc_synthetic"]["accuracy,none"]
    [samples_file] = (tmp_path / "lmms").rglob("*_samples_vtc_synthetic.jsonl")
    lmms_answers = {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, samples_file.read_text().splitlines())}

    pipe = load_pipeline(BridgeOptions())  # vtc bench's default model: the shipped demo checkpoint and its CLIP
    BenchRunner(pipe, tmp_path / "bench", batch_size=8).run(make_plan(pipe, ["synthetic"], [method], [budget], limit))
    records = read_records(tmp_path / "bench")
    [row] = summarise(records)
    assert row["n"] == limit and len(lmms_answers) == limit
    assert lmms_accuracy == pytest.approx(row["score"], abs=0.005)  # vtc rounds to 2 decimals
    ids = [json.loads(line)["id"] for line in (task_dir / "vtc_synthetic.jsonl").read_text().splitlines()]
    by_id = {r["sample_id"]: r["prediction"] for r in records}
    assert [lmms_answers[i] for i in range(limit)] == [by_id[i] for i in ids]  # the same answer to every question
    print(f"\nlmms-eval accuracy {lmms_accuracy:.2f}, vtc bench score {row['score']:.2f} ({method}@{budget}, {limit} samples)")


# ----------------------------------------------------------------------------- a torchvision that cannot load


def _broken_torchvision(root: Path) -> dict:
    """A torchvision that fails to import as PyPI's CUDA build does beside a CPU torch, first on the path."""
    package = root / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    meta = root / "torchvision-0.28.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(SRC)])}


def test_a_broken_torchvision_is_one_message_with_the_fix(tmp_path):
    env = _broken_torchvision(tmp_path / "site")
    cli = subprocess.run([sys.executable, "-m", "vtc.cli", "demo", "--limit", "1", "--out", str(tmp_path / "demo")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert "Traceback" not in cli.stderr
    message = " ".join(cli.stderr.split())
    assert "torchvision 0.28.0 is installed but cannot be loaded" in message
    assert "operator torchvision::nms does not exist" in message and "pip uninstall torchvision" in message
    library = subprocess.run([sys.executable, "-c", "import vtc.pipeline"], env=env, capture_output=True, text=True, timeout=300)
    assert library.returncode == 1 and library.stderr.strip().splitlines()[-1].startswith("vtc.methods.base.VTCError: torchvision 0.28.0")


def test_text_source_llm_from_model_args_scores_text_with_the_models_embeddings(tiny_dirs):
    from vtc.bench.lmms import load_pipeline
    from vtc.models.embed_text import EmbeddingTextScorer

    options = bridge_options(pretrained=str(tiny_dirs[0]), method="recoverable", text_source="llm")
    pipe = load_pipeline(options)
    assert isinstance(pipe.adapter.text_scorer, EmbeddingTextScorer)
    items = [("what is the color ?", {"max_new_tokens": 3}, [random_image(5)])]
    direct = pipe([random_image(5)], ["what is the color ?"], method="recoverable", max_new_tokens=3)[0].text
    assert answer_requests(pipe, options, items) == [direct]
