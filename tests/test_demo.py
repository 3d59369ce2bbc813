"""The synthetic benchmark generator and the shipped demo checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest

from vtc.demo.scenes import COLORS, GRID, PATCH, SPLITS, cells_of, make_sample, split_seeds

CHECKPOINT = Path(__file__).resolve().parents[1] / "src" / "vtc" / "demo" / "checkpoint"


def test_generator_is_deterministic():
    a, b = make_sample(123), make_sample(123)
    assert (a.question, a.answer, a.answer_cells) == (b.question, b.answer, b.answer_cells)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_sample(124).question != a.question or not np.array_equal(np.asarray(make_sample(124).image), np.asarray(a.image))


def test_splits_are_disjoint():
    for i, x in enumerate(SPLITS.values()):
        for y in list(SPLITS.values())[i + 1 :]:
            assert x.stop <= y.start or y.stop <= x.start
    with pytest.raises(ValueError, match="unknown split"):
        split_seeds("dev")


@pytest.mark.parametrize("seed", range(2_000_000, 2_000_040))
def test_answer_cells_cover_the_drawn_object_and_answers_match_the_scene(seed):
    s = make_sample(seed)
    pixels = np.asarray(s.image)
    small = s.objects[-1]
    x0, y0, x1, y1 = small.box
    cy, cx = (y0 + 2 * y1) // 3, (x0 + x1) // 2  # inside every shape (triangle: lower middle)
    assert tuple(pixels[cy, cx]) == COLORS[small.color]
    if s.small_target:
        assert (cy // PATCH) * GRID + cx // PATCH in s.answer_cells
        assert set(s.answer_cells) == set(cells_of(small.box))
    if s.qtype == "small_color":
        assert s.answer == small.color and small.shape in s.question
    elif s.qtype == "small_shape":
        assert s.answer == small.shape and small.color in s.question
    elif s.qtype == "small_exists":
        named = f"{small.color} {small.shape}" in s.question
        assert s.answer == ("yes" if named else "no")
    elif s.qtype == "big_count":
        assert s.answer == ["zero", "one", "two", "three"][len(s.objects) - 1]


def test_small_target_questions_are_the_majority():
    samples = [make_sample(s) for s in split_seeds("test")[:300]]
    assert sum(s.small_target for s in samples) / len(samples) >= 0.5


needs_checkpoint = pytest.mark.skipif(not (CHECKPOINT / "llava" / "config.json").is_file(), reason="no demo checkpoint")


@needs_checkpoint
def test_shipped_checkpoint_answers_with_all_tokens():
    from vtc.demo.evaluate import run_method, test_samples
    from vtc.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(CHECKPOINT / "llava", clip=CHECKPOINT / "clip")
    score = run_method(pipe, test_samples(48), "none", "auto").summary()
    assert score["accuracy"] >= 80.0, score  # the shipped model reaches 92.8% on 500; chance on this mix is ~25%


@needs_checkpoint
def test_text_recovery_beats_visual_only_selection_on_small_targets():
    from vtc.demo.evaluate import run_method, test_samples
    from vtc.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(CHECKPOINT / "llava", clip=CHECKPOINT / "clip")
    small = [s for s in test_samples(120) if s.small_target][:64]
    recoverable = run_method(pipe, small, "recoverable", 0.1).summary()["accuracy"]
    prumerge = run_method(pipe, small, "prumerge", 0.1).summary()["accuracy"]
    assert recoverable >= prumerge + 5, (recoverable, prumerge)  # measured on 300: 89.6 vs 28.9


@needs_checkpoint
def test_shipped_checkpoint_knows_both_families_and_answers_clutter_questions():
    from vtc.demo.evaluate import run_method, saved_families, test_samples
    from vtc.pipeline import Pipeline

    assert saved_families(CHECKPOINT) == ("basic", "clutter")
    pipe = Pipeline.from_pretrained(CHECKPOINT / "llava", clip=CHECKPOINT / "clip")
    score = run_method(pipe, test_samples(48, "clutter"), "none", "auto").summary()
    # measured on 300: 100.0 (each type 100); chance on this mix is about 30%
    assert score["accuracy"] >= 85.0, score
    assert set(score["by_qtype"]) == {"shape_by_color", "exists_by_attrs", "text_by_color"}, score
    assert all(acc >= 70.0 for acc in score["by_qtype"].values()), score


@needs_checkpoint
def test_demo_runs_and_writes_pictures(tmp_path):
    from vtc.demo.run import DEMO_RUNS, run_demo

    scores = run_demo(limit=6, out=tmp_path)
    assert set(scores) == {label for label, _, _ in DEMO_RUNS}
    assert scores["none"]["mean_tokens"] == 196
    assert scores["random@10%"]["mean_tokens"] == round(0.1 * 196)
    assert (tmp_path / "token_maps.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo_results.json").read_text())["none"]["n"] == 6
    clutter = run_demo(limit=6, out=tmp_path / "clutter", family="clutter")
    assert clutter["none"]["mean_tokens"] == 196 and (tmp_path / "clutter" / "token_maps.png").stat().st_size > 10_000


def test_training_command_is_reproducible(tmp_path):
    """The training script, at toy length, gives bit-identical weights twice from one seed."""
    import torch
    from safetensors.torch import load_file

    from vtc.demo.train import main

    tiny = ["--clip-steps", "2", "--images", "16", "--align-steps", "1", "--tune-steps", "3", "--batch", "4", "--eval", "0"]
    for run in ("a", "b"):
        main(["--out", str(tmp_path / run), "--seed", "3", *tiny])
    for part in ("llava", "clip"):
        a, b = (load_file(tmp_path / run / part / "model.safetensors") for run in ("a", "b"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["seed"] == 3 and report["checkpoint_mb"] > 0
    # a different seed trains different weights (the check above can fail)
    main(["--out", str(tmp_path / "c"), "--seed", "4", *tiny])
    a, c = (load_file(tmp_path / run / "llava" / "model.safetensors") for run in ("a", "c"))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # the LLaVA stages on a reused CLIP (--clip) train exactly what the whole command trains
    main(["--out", str(tmp_path / "d"), "--seed", "3", "--clip", str(tmp_path / "a" / "clip"), *tiny])
    d = load_file(tmp_path / "d" / "llava" / "model.safetensors")
    assert all(torch.equal(a[k], d[k]) for k in a)
    # --llm-hidden sets the language model's width
    main(["--out", str(tmp_path / "e"), "--seed", "3", "--clip", str(tmp_path / "a" / "clip"), "--llm-hidden", "64", *tiny])
    e = load_file(tmp_path / "e" / "llava" / "model.safetensors")
    widths = {v.shape[1] for k, v in e.items() if k.endswith("embed_tokens.weight")}
    assert widths == {64} and {v.shape[1] for k, v in a.items() if k.endswith("embed_tokens.weight")} == {128}
    # --turns puts several questions in one sequence: other batches, other weights, still reproducible
    for run in ("f", "g"):
        main(["--out", str(tmp_path / run), "--seed", "3", "--clip", str(tmp_path / "a" / "clip"), "--turns", "3", *tiny])
    f, g = (load_file(tmp_path / run / "llava" / "model.safetensors") for run in ("f", "g"))
    assert all(torch.equal(f[k], g[k]) for k in f) and not all(torch.equal(a[k], f[k]) for k in a)
    # --focus-steps shows clutter images on fewer tokens first: other weights, still reproducible
    for run in ("h", "i"):
        main(["--out", str(tmp_path / run), "--seed", "3", "--clip", str(tmp_path / "a" / "clip"), "--focus-steps", "2",
              "--focus-start", "4", *tiny])
    h, i = (load_file(tmp_path / run / "llava" / "model.safetensors") for run in ("h", "i"))
    assert all(torch.equal(h[k], i[k]) for k in h) and not all(torch.equal(a[k], h[k]) for k in a)
    # --stages shows single clutter questions on their own cells first: other weights, still reproducible
    for run in ("j", "k"):
        main(["--out", str(tmp_path / run), "--seed", "3", "--clip", str(tmp_path / "a" / "clip"), "--stages", "4:1:text_by_color,8:1",
              *tiny])
    j, k_ = (load_file(tmp_path / run / "llava" / "model.safetensors") for run in ("j", "k"))
    assert all(torch.equal(j[k], k_[k]) for k in j) and not all(torch.equal(a[k], j[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--llm-hidden", "100"], "multiple of 32"), (["--threads", "0"], "at least 1"),
    (["--attend-layer", "3"], "0..2"), (["--attend", "-1"], "--attend must be >= 0"),
    (["--turns", "0"], "--turns must be at least 1"), (["--turns", "2", "--attend", "1"], "with --turns 1"),
    (["--focus-steps", "-1"], "--focus-steps must lie in [0, --tune-steps]"),
    (["--focus-steps", "9000"], "--focus-steps must lie in [0, --tune-steps]"), (["--focus-start", "0"], "at least 1"),
    (["--stages", "8"], "--stages: '8' is not tokens:steps"), (["--stages", "8:9000"], "exceed --tune-steps"),
    (["--stages", "8:10", "--focus-steps", "5"], "two curricula"),
    (["--stages", "8:10", "--clutter-fraction", "0"], "needs --clutter-fraction > 0"),
])
def test_training_command_refuses_bad_sizes(args, message, capsys):
    from vtc.demo.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--eval", "0", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
