"""The clutter scene family: answers and answer cells checked against the drawn pixels."""

import re

import numpy as np
import pytest

from vtc.demo import scenes, scenes_v2
from vtc.demo.scenes import COLORS, GRID, PATCH, SHAPES
from vtc.demo.scenes_v2 import COUNTS, FONT, QTYPES, make_sample, render

SEEDS = range(12_000_000, 12_000_020)


def cell_of(y: int, x: int) -> int:
    return (y // PATCH) * GRID + x // PATCH


def color_mask(pixels, name):
    return np.all(pixels == COLORS[name], axis=-1)


def shape_from_pixels(mask) -> str:
    """Circle, square or triangle from how much of its bounding box a solid shape fills (pi/4, 1, 1/2)."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle"


def read_word(pixels, cells, ink_color: str) -> str:
    """Decode the 2x-scaled 3x5 letters drawn in ``ink_color`` inside ``cells``, by the font table's bitmaps."""
    ink = np.all(pixels == scenes.COLORS[ink_color], axis=-1)
    inside = np.zeros_like(ink)
    for c in cells:
        r, k = divmod(c, GRID)
        inside[r * PATCH : (r + 1) * PATCH, k * PATCH : (k + 1) * PATCH] = True
    ys, xs = np.nonzero(ink & inside)
    top, left, right = ys.min(), xs.min(), xs.max()
    letters = []
    for x in range(left, right + 1, 7):
        block = ink[top : top + 10 : 2, x : x + 6 : 2]
        bits = tuple("".join("#" if b else "." for b in row) for row in block)
        matches = [k for k, v in FONT.items() if v == bits]
        assert len(matches) == 1, bits
        letters.append(matches[0])
    return "".join(letters).lower()


def big_named(sample, shape):
    (big,) = [o for o in sample.objects if o.kind == "big" and o.shape == shape]
    return big


def check_position(sample):
    """The target lies beside the named big shape, within 3 cells, across its span; nothing else small is there."""
    relation, shape = re.search(r"(above|below|left of|right of) the big (\w+)", sample.question).groups()
    bx0, by0, bx1, by1 = big_named(sample, shape).box
    reach = 3 * PATCH
    lo_x, hi_x = bx0 // PATCH * PATCH, (bx1 - 1) // PATCH * PATCH + PATCH  # the big shape's columns, whole cells
    lo_y, hi_y = by0 // PATCH * PATCH, (by1 - 1) // PATCH * PATCH + PATCH
    region = {
        "above": (lo_x, lo_y - reach, hi_x, by0), "below": (lo_x, by1, hi_x, hi_y + reach),
        "left of": (lo_x - reach, lo_y, bx0, hi_y), "right of": (bx1, lo_y, hi_x + reach, hi_y),
    }[relation]
    inside = [o for o in sample.objects if o.kind != "big" and region[0] <= o.box[0] and o.box[2] <= region[2]
              and region[1] <= o.box[1] and o.box[3] <= region[3]]
    kind = "sign" if "written" in sample.question else "small"
    assert [o for o in inside if o.kind == kind] and len(inside) == 1, (sample.question, inside)
    return inside[0]


@pytest.mark.parametrize("qtype", QTYPES)
def test_answers_and_answer_cells_match_the_pixels(qtype):
    for seed in SEEDS:
        s = make_sample(seed, qtype)
        pixels = np.asarray(s.image)
        targets = [i for i, o in enumerate(s.objects) if o.kind != "big" and set(scenes.cells_of(o.box)) <= set(s.answer_cells)]
        # the answer cells hold what the answer depends on: leaving it out changes pixels there and nowhere else
        changed = np.any(np.asarray(render(s.scene, without=set(targets))) != pixels, axis=-1)
        cells = {cell_of(y, x) for y, x in zip(*np.nonzero(changed))}
        assert cells == set(s.answer_cells), (seed, qtype)
        assert s.small_target
        outside_bigs = np.ones(pixels.shape[:2], dtype=bool)  # and outside the signs, whose ink has a palette colour
        for o in s.objects:
            if o.kind != "small":
                outside_bigs[max(0, o.box[1] - 1) : o.box[3] + 1, max(0, o.box[0] - 1) : o.box[2] + 1] = False
        if qtype in ("shape_by_color", "exists_by_attrs"):
            color = re.search(r"small (\w+)", s.question).group(1)
            mask = color_mask(pixels, color) & outside_bigs
            assert {cell_of(y, x) for y, x in zip(*np.nonzero(mask))} == set(s.answer_cells)  # one small of that colour
            drawn = shape_from_pixels(mask)
            if qtype == "shape_by_color":
                assert s.answer == drawn
            else:
                asked = s.question.split()[-2]
                assert asked in SHAPES and s.answer == ("yes" if asked == drawn else "no")
        elif qtype == "count_by_color":
            color = re.search(r"small (\w+) shapes", s.question).group(1)
            mask = color_mask(pixels, color) & outside_bigs
            per_cell = np.bincount([cell_of(y, x) for y, x in zip(*np.nonzero(mask))], minlength=GRID * GRID)
            assert s.answer == COUNTS[int((per_cell >= 20).sum())]
        elif qtype == "color_by_position":
            target = check_position(s)
            (color,) = [c for c in COLORS if color_mask(pixels, c)[target.box[1] : target.box[3], target.box[0] : target.box[2]].sum() >= 20]
            assert s.answer == color
        elif qtype == "text_by_color":  # the one sign whose ink has the asked colour says the answer
            color = re.search(r"on the (\w+) sign", s.question).group(1)
            (sign,) = [o for o in s.objects if o.kind == "sign" and color_mask(pixels, color)[o.box[1] : o.box[3], o.box[0] : o.box[2]].sum() >= 10]
            assert set(scenes.cells_of(sign.box)) == set(s.answer_cells)
            assert read_word(pixels, s.answer_cells, color) == s.answer
        else:
            sign = check_position(s)
            assert read_word(pixels, s.answer_cells, sign.color) == s.answer


def test_generator_is_deterministic_and_splits_are_disjoint_from_the_basic_family():
    a, b = make_sample(12_000_005), make_sample(12_000_005)
    assert (a.question, a.answer, a.answer_cells) == (b.question, b.answer, b.answer_cells)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(make_sample(12_000_006).image), np.asarray(a.image))
    ranges = list(scenes.SPLITS.values()) + list(scenes_v2.SPLITS.values())
    for i, x in enumerate(ranges):
        for y in ranges[i + 1 :]:
            assert x.stop <= y.start or y.stop <= x.start
    with pytest.raises(ValueError, match="unknown split"):
        scenes_v2.split_seeds("dev")
    with pytest.raises(ValueError, match="unknown question type"):
        make_sample(12_000_000, "big_color")


def test_scenes_have_more_small_things_than_a_ten_percent_budget_keeps():
    """Small shapes, signs and big shapes together cover more than 20 of the 196 cells in every scene, and the
    question picks different cells for different questions on one image."""
    for seed in range(12_000_100, 12_000_140):
        s = make_sample(seed)
        small_cells = {c for o in s.objects if o.kind != "big" for c in scenes.cells_of(o.box)}
        big_cells = {c for o in s.objects if o.kind == "big" for c in scenes.cells_of(o.box)}
        assert len(small_cells) >= 7 and len(small_cells | big_cells) > 20, seed
        assert sum(o.kind == "sign" for o in s.objects) == 2
        for o in s.objects:  # a small shape inside one cell, a 2-letter sign in one, a 3-letter sign in two
            if o.kind != "big":
                assert len(scenes.cells_of(o.box)) == (1 if o.kind == "small" else len(o.word) - 1), (seed, o)
        by_type = {q: make_sample(seed, q).answer_cells for q in ("shape_by_color", "color_by_position", "text_by_position")}
        assert by_type["text_by_position"] not in (by_type["shape_by_color"], by_type["color_by_position"]), seed


def test_vocabulary_holds_every_question_and_answer_word():
    words = set(scenes.VOCAB) | set(scenes_v2.EXTRA_VOCAB)
    for seed in range(12_000_200, 12_000_260):
        s = make_sample(seed)
        assert set(s.question.split()) <= words and s.answer in words, s.question
    assert not set(scenes_v2.EXTRA_VOCAB) & set(scenes.VOCAB) - set(COUNTS)  # new words do not shadow old ones


def test_patch_labels_with_words_agree_with_the_full_canvas_labels_and_mark_signs():
    """The per-cell fast labeller gives the basic labeller's classes on basic scenes, and the word on sign cells."""
    import random

    import torch

    from vtc.demo import train
    from vtc.demo.scenes_v2 import PLATE, WORDS

    for seed in range(40, 46):
        _, objects = scenes.make_scene(random.Random(seed))
        fast, fast_cover = train.patch_targets(objects, words=True)
        slow, slow_cover = train.patch_targets(objects)
        assert torch.equal(fast[:3], slow) and not fast[3].any()
        assert torch.allclose(fast_cover, slow_cover)
    for seed in SEEDS[:6]:
        s = make_sample(seed)
        labels, _ = train.patch_targets(s.objects, words=True)
        pixels = np.asarray(s.image)
        for o in s.objects:
            if o.kind == "sign":  # every cell holding this sign's plate is labelled with its word, and only those
                plate = np.all(pixels == PLATE, axis=-1)
                x0, y0, x1, y1 = o.box
                cells = {cell_of(y, x) for y, x in zip(*np.nonzero(plate)) if x0 <= x < x1 and y0 <= y < y1}
                assert {c for c in range(GRID * GRID) if labels[3, c] == 1 + WORDS.index(o.word)} == cells
                assert all(labels[0, c] == 1 + list(scenes.COLORS).index(o.color) for c in cells)  # its ink
                assert all(labels[1, c] == 0 and labels[2, c] == 0 for c in cells)


def test_minimal_pairs_and_vocabularies():
    import random

    from vtc.demo.evaluate import checkpoint_families
    from vtc.demo.families import vocabulary
    from vtc.demo.train import clutter_contrast_questions

    items = make_sample(12_000_003).objects
    for r in range(10):  # "yes" names the drawn shape, "no" another shape of the same (once-only) colour
        exists = clutter_contrast_questions(items, "exists_by_attrs", random.Random(r))
        (color, yes_shape), (color_no, no_shape) = [q.split()[4:6] for q, _, _ in exists]
        (drawn,) = [i for i, o in enumerate(items) if o.kind == "small" and o.color == color]
        assert [a for _, a, _ in exists] == ["yes", "no"] and color == color_no and yes_shape == items[drawn].shape != no_shape
        assert [t for _, _, t in exists] == [[drawn], [drawn]]  # both answers depend on the one shape of that colour
        for q, a, (t,) in clutter_contrast_questions(items, "shape_by_color", random.Random(r)):
            assert items[t].kind == "small" and items[t].shape == a and f" {items[t].color} " in q
    for qtype in ("text_by_position", "text_by_color"):
        signs = clutter_contrast_questions(items, qtype, random.Random(0))
        assert sorted(a for _, a, _ in signs) == sorted(o.word for o in items if o.kind == "sign") and signs[0][0] != signs[1][0]
        assert all(items[t].word == a for _, a, (t,) in signs)
    assert all(f" {items[t].color} sign" in q for q, _, (t,) in clutter_contrast_questions(items, "text_by_color", random.Random(0)))
    assert vocabulary(["basic"]) == scenes.VOCAB  # the basic recipe keeps its tokenizer
    both = vocabulary(["basic", "clutter"])
    assert both[: len(scenes.VOCAB)] == scenes.VOCAB and set(scenes_v2.EXTRA_VOCAB) <= set(both)

    class Pipe:  # checkpoint_families reads only the tokenizer's vocabulary
        def __init__(self, words):
            self.processor = type("P", (), {"tokenizer": type("T", (), {"get_vocab": lambda _: dict.fromkeys(words)})()})()

    assert checkpoint_families(Pipe(scenes.VOCAB)) == ("basic",)
    assert checkpoint_families(Pipe(both)) == ("basic", "clutter")


def test_attention_focus_targets_point_at_the_answer_cells_and_the_loss_is_their_attention_mass():
    """make_batch's focus rows: the position that predicts the answer's first token, and the sequence positions of
    the answer cells' image tokens; focus_loss is -log of head 0's attention mass there (a hand-made case)."""
    import torch

    from vtc.demo import train
    from vtc.demo.families import vocabulary
    from vtc.testing import word_tokenizer

    tokenizer = word_tokenizer(words=vocabulary(["basic", "clutter"]))
    clip = train.build_clip(word_tokenizer(words=vocabulary(["basic", "clutter"]), model_max_length=16, add_eos=True))
    llava = train.build_llava(clip, tokenizer, layers=2, hidden=64)
    feats = torch.randn(2, GRID * GRID, 128)
    pairs = [(0, "what is there ?", "big red circle"), (1, "what shape is the small red object ?", "circle", [5, 6, 20])]
    x, mask, y, focus = train.make_batch(llava, tokenizer, feats, pairs, None, False, torch.Generator())
    ((row, query, positions),) = focus  # only the pair with answer cells
    assert row == 1 and y[1, query] == -100 and y[1, query + 1] == tokenizer.convert_tokens_to_ids("circle")
    projected = llava.model.multi_modal_projector(feats[1])
    assert torch.allclose(x[1, positions], projected[[5, 6, 20]])
    assert not train.make_batch(llava, tokenizer, feats, pairs, 50, False, torch.Generator())[3]  # subsets: no focus

    attention = torch.zeros(2, 2, 6, 6)
    attention[1, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25, 0.0])
    attention[1, 1, 4] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # other heads are not taught
    assert torch.isclose(train.focus_loss(attention, [(1, 4, [1, 3])]), -torch.log(torch.tensor(0.35)))
    # the training loss returns it from the named layer's attention (eager), and None without focus rows
    llava.model.language_model.set_attn_implementation("eager")
    loss, attend = train.lm_loss(llava, x, mask, y, focus, attend_layer=1)
    layer = llava.model.language_model(inputs_embeds=x, attention_mask=mask, output_attentions=True).attentions[1]
    assert attend is not None and torch.isclose(attend, -layer[1, 0, query, positions].sum().log())
    assert train.lm_loss(llava, x, mask, y, [], attend_layer=1)[1] is None


def test_multi_turn_sequences_follow_the_chat_template_and_supervise_every_answer():
    """make_batch on a conversation: the text around the image tokens is the chat template's rendering of the turns
    (tokenised), and exactly each answer and its </s> are labelled; the first turn is the one-question sequence."""
    import torch
    from jinja2 import Template

    from vtc.demo import train
    from vtc.demo.families import vocabulary
    from vtc.testing import CHAT_TEMPLATE, word_tokenizer

    tokenizer = word_tokenizer(words=vocabulary(["basic", "clutter"]))
    clip = train.build_clip(word_tokenizer(words=vocabulary(["basic", "clutter"]), model_max_length=16, add_eos=True))
    llava = train.build_llava(clip, tokenizer, layers=1, hidden=64)
    feats = torch.randn(1, GRID * GRID, 128)
    turns = [("what shape is the small red object ?", "circle"), ("how many small blue shapes are there ?", "two"),
             ("what is written left of the big square ?", "cat")]
    x, mask, y, _ = train.make_batch(llava, tokenizer, feats, [(0, turns, None)], None, False, torch.Generator())
    messages = []
    for index, (question, answer) in enumerate(turns):
        content = ([{"type": "image"}] if index == 0 else []) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    ids = tokenizer(Template(CHAT_TEMPLATE).render(messages=messages), add_special_tokens=False)["input_ids"]
    image = ids.index(llava.config.image_token_id)
    expected = ids[:image] + [-1] * (GRID * GRID) + ids[image + 1 :]  # -1: an image token
    assert x.shape[1] == len(expected) and bool(mask.all())
    embed = llava.model.language_model.embed_tokens
    text = [p for p, t in enumerate(expected) if t >= 0]
    assert torch.equal(x[0, text], embed(torch.tensor([expected[p] for p in text])))
    eos = tokenizer.eos_token_id
    answers = [tokenizer.convert_tokens_to_ids(a) for _, a in turns]
    labelled = [(p, t) for p, t in enumerate(y[0].tolist()) if t != -100]
    assert [t for _, t in labelled] == [t for a in answers for t in (a, eos)]
    assert all(expected[p] == t for p, t in labelled)  # each label sits on its own token of the sequence
    single = train.make_batch(llava, tokenizer, feats, [(0, *turns[0])], None, False, torch.Generator())
    assert torch.equal(single[0][0], x[0, : single[0].shape[1]]) and torch.equal(single[2][0], y[0, : single[2].shape[1]])


def test_grounding_loss_reads_each_word_list_against_its_label_row():
    """grounding_loss with ``rows``: each word list is scored against its own label row (the size row for
    --ground-size), unlabelled patches are skipped; equal to a hand-computed cross-entropy."""
    import torch
    import torch.nn.functional as F

    from vtc.demo import train
    from vtc.demo.families import vocabulary
    from vtc.testing import word_tokenizer

    tokenizer = word_tokenizer(words=vocabulary(["basic", "clutter"]))
    clip = train.build_clip(word_tokenizer(words=vocabulary(["basic", "clutter"]), model_max_length=16, add_eos=True))
    llava = train.build_llava(clip, tokenizer, layers=1, hidden=64)
    feats = torch.randn(2, GRID * GRID, 128)
    labels = torch.zeros(2, 4, GRID * GRID, dtype=torch.long)
    labels[0, 2, :5], labels[1, 2, 7:9] = 2, 1  # small on five patches of image 0, big on two of image 1
    labels[0, 0, :3] = 4  # a colour label row that the size list must not read
    size_ids = tokenizer.convert_tokens_to_ids(["big", "small"])
    got = train.grounding_loss(llava, feats, labels, [size_ids], rows=(2,))
    tokens = F.normalize(llava.model.multi_modal_projector(feats), dim=-1)
    words = F.normalize(llava.model.language_model.embed_tokens.weight[size_ids], dim=-1)
    chosen = torch.cat([tokens[0, :5], tokens[1, 7:9]])
    expected = F.cross_entropy(10.0 * chosen @ words.T, torch.tensor([1] * 5 + [0] * 2))
    assert torch.isclose(got, expected)


def test_ideal_tokens_are_the_summed_unit_word_embeddings_and_make_batch_places_them():
    """ideal_tokens: a patch is the sum of its label words' unit embeddings (rows of ``labels`` mapped to word lists),
    background zero, times the mean embedding norm; hand-computed on a 4-patch map. make_batch with ``tokens`` puts
    exactly those rows where the projector's tokens would go."""
    import torch
    import torch.nn.functional as F

    from vtc.demo import train
    from vtc.demo.families import vocabulary
    from vtc.testing import word_tokenizer

    embed = torch.randn(10, 6)
    labels = torch.tensor([[0, 1, 2, 0], [0, 2, 2, 0], [0, 0, 0, 1]])  # rows: "colour", "shape", "size"
    word_ids = [[3, 4], [5, 6], [8, 9]]  # class c of row r is word word_ids[r][c - 1]
    got = train.ideal_tokens(embed, labels, word_ids, (0, 1, 2), 0.0, torch.Generator())
    unit = F.normalize(embed, dim=-1)
    scale = embed.norm(dim=-1).mean()
    expected = torch.stack([torch.zeros(6), unit[3] + unit[6], unit[4] + unit[6], unit[8]]) * scale
    assert torch.allclose(got, expected, atol=1e-6)
    noisy = train.ideal_tokens(embed, labels, word_ids, (0, 1, 2), 0.3, torch.Generator().manual_seed(0))
    assert 0.1 < float((noisy - got).norm(dim=-1).mean() / scale) < 0.5  # noise of norm about 0.3 (in unit words)

    tokenizer = word_tokenizer(words=vocabulary(["basic", "clutter"]))
    clip = train.build_clip(word_tokenizer(words=vocabulary(["basic", "clutter"]), model_max_length=16, add_eos=True))
    llava = train.build_llava(clip, tokenizer, layers=1, hidden=64)
    fixed = torch.randn(2, GRID * GRID, 64)
    pairs = [(1, "what shape is the small red object ?", "circle")]
    x, _, y, _ = train.make_batch(llava, tokenizer, torch.zeros(2, GRID * GRID, 1), pairs, None, False,
                                  torch.Generator(), tokens=lambda i: fixed[i])
    at = train.prompt_ids(tokenizer, pairs[0][1]).index(llava.config.image_token_id)
    assert torch.equal(x[0, at : at + GRID * GRID], fixed[1])
    assert (y[0] != -100).sum() == 2  # the answer and </s>


def test_lm_probe_reports_each_requested_question_type(tmp_path):
    """scripts/probe_demo_lm.py at toy size: an accuracy per requested clutter type at each evaluation, in [0, 100]."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "probe_demo_lm.py"
    spec = importlib.util.spec_from_file_location("probe_demo_lm", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "curve.json"
    curve = probe.main(["--steps", "2", "--eval-every", "1", "--images", "6", "--test", "12", "--batch", "4",
                        "--layers", "1", "--hidden", "64", "--qtypes", "shape_by_color,count_by_color", "--out", str(out)])
    assert [p["step"] for p in curve] == [1, 2]
    assert all(set(p["accuracy"]) <= {"shape_by_color", "count_by_color"} and p["accuracy"] for p in curve)
    assert all(0 <= v <= 100 for p in curve for v in p["accuracy"].values())
    assert json.loads(out.read_text())["curve"] == curve
    with pytest.raises(SystemExit):
        probe.main(["--qtypes", "colour_of_sky"])
    # with --stages, an evaluation inside a stage also reports accuracy at the stage's tokens
    staged = probe.main(["--steps", "2", "--eval-every", "1", "--images", "6", "--test", "12", "--batch", "4",
                         "--layers", "1", "--hidden", "64", "--qtypes", "shape_by_color", "--stages", "4:1"])
    assert staged[0]["stage_tokens"] == 4 and set(staged[0]["accuracy_at_stage"]) == {"shape_by_color"}
    assert "stage_tokens" not in staged[1]
    with pytest.raises(SystemExit):
        probe.main(["--stages", "4:1", "--focus-steps", "1"])
    # a stage with question types asks only those
    runner = probe.Probe(probe.parse_args(["--images", "6", "--test", "4", "--layers", "1", "--hidden", "64",
                                           "--stages", "4:1:text_by_color"]))
    runner.stage = runner.args.stages[0]
    asked = [q for _ in range(10) for _, q, _, _ in runner.questions(0)]
    assert all(q.startswith("what is written on the ") for q in asked)


def test_focus_curriculum_shows_the_things_cells_plus_random_others_growing_to_all():
    """context_cells keeps every given cell and fills up with distinct random others, in raster order;
    focus_context grows linearly from the start size to all tokens; make_batch with a context shows exactly
    the chosen feature rows for images with cells and every row for the others (shown None)."""
    import torch

    from vtc.demo import train
    from vtc.demo.families import vocabulary
    from vtc.testing import word_tokenizer

    gen = torch.Generator().manual_seed(0)
    cells = [5, 40, 41, 150]
    for size in (2, 4, 10, 196, 500):
        chosen = train.context_cells(cells, 196, size, gen)
        assert chosen.tolist() == sorted(set(chosen.tolist())) and set(cells) <= set(chosen.tolist())
        assert chosen.numel() == min(196, max(size, len(cells))) and int(chosen.max()) < 196
    draws = {tuple(train.context_cells(cells, 196, 10, gen).tolist()) for _ in range(20)}
    assert len(draws) > 1  # the others are random
    assert [train.focus_context(s, 100, 16, 196) for s in (0, 50, 99, 100)] == [16, 106, 194, 196]

    tokenizer = word_tokenizer(words=vocabulary(["basic", "clutter"]))
    clip = train.build_clip(word_tokenizer(words=vocabulary(["basic", "clutter"]), model_max_length=16, add_eos=True))
    llava = train.build_llava(clip, tokenizer, layers=1, hidden=64)
    feats = torch.randn(2, GRID * GRID, 128)
    pairs = [(0, "what shape is the small red object ?", "circle"), (1, "what color is the small circle ?", "red")]
    shown = []
    llava.model.multi_modal_projector.register_forward_hook(lambda module, args, out: shown.append(args[0]))
    gen.manual_seed(7)
    x, mask, _, _ = train.make_batch(llava, tokenizer, feats, pairs, None, False, torch.Generator().manual_seed(1),
                                     shown=lambda i, _: train.context_cells(cells, GRID * GRID, 12, gen) if i == 0 else None)
    expected = train.context_cells(cells, GRID * GRID, 12, torch.Generator().manual_seed(7))
    assert torch.equal(shown[0], feats[0, expected]) and torch.equal(shown[1], feats[1])
    prompt = [len(train.prompt_ids(tokenizer, q)) for _, q, _ in pairs]
    assert int(mask[0].sum()) - prompt[0] == int(mask[1].sum()) - prompt[1] - (GRID * GRID - 12)


def test_stage_cells_show_the_answer_whole_other_things_that_fit_and_random_cells():
    """--stages: a clutter question sees its answer's cells, other small shapes and signs whole while they fit, random
    cells up to the stage's size, ascending; a basic image or a question without answer cells sees everything;
    stage_at walks the stages; parse_stages reads tokens:steps and names what is wrong."""
    import torch

    from vtc.demo import train

    import random

    scene = scenes_v2.make_scene(random.Random(scenes_v2.split_seeds("train")[5]))
    items = scene.items
    things = [t for t, item in enumerate(items) if item.kind != "big"]
    answer = train.item_cells(items, [things[0]])
    thing_sets = [set(train.item_cells(items, [t])) for t in things[1:]]
    gen = torch.Generator().manual_seed(0)
    for size in (1, len(answer), 8, 16, 60, 196):
        for _ in range(5):
            cells = train.stage_cells(items, answer, size, GRID * GRID, gen).tolist()
            assert cells == sorted(set(cells)) and set(answer) <= set(cells)
            assert len(cells) == min(GRID * GRID, max(size, len(answer)))
            # a thing that is not shown whole would not have fitted beside those that are
            whole = [c <= set(cells) for c in thing_sets]
            shown_whole = set(answer).union(*[c for c, w in zip(thing_sets, whole) if w])
            assert all(len(shown_whole) + len(c - shown_whole) > size for c, w in zip(thing_sets, whole) if not w)
    signs = [t for t in things if items[t].kind == "sign"]
    sign_answer, rival = (set(train.item_cells(items, [t])) for t in signs)
    for _ in range(5):  # rivals first: room for the answer and one more sign shows the other sign, nothing else
        shown = train.stage_cells(items, sorted(sign_answer), len(sign_answer | rival), GRID * GRID, gen).tolist()
        assert shown == sorted(sign_answer | rival)
    everything = set(answer).union(*thing_sets)  # room for every thing and nothing else: exactly the things
    assert train.stage_cells(items, answer, len(everything), GRID * GRID, gen).tolist() == sorted(everything)
    assert train.stage_cells(items, None, 8, GRID * GRID, gen) is None
    basic = scenes.make_sample(scenes.split_seeds("test")[0])
    assert train.stage_cells(basic.objects, [3], 8, GRID * GRID, gen) is None

    stages = train.parse_stages("8:3:shape_by_color+text_by_color, 16:2")
    assert stages == [train.Stage(8, 3, ("shape_by_color", "text_by_color")), train.Stage(16, 2)]
    assert [getattr(train.stage_at(s, stages), "tokens", None) for s in range(7)] == [8, 8, 8, 16, 16, None, None]
    assert train.stage_at(0, []) is None and train.parse_stages("") == []
    for bad, message in (("8", "tokens:steps"), ("8:x", "tokens:steps"), ("0:5", "at least 1"), ("4:0", "at least 1"),
                         ("8:3:big_color", "unknown question types"), ("8:3:shape_by_color:x", "too many")):
        with pytest.raises(ValueError, match=message):
            train.parse_stages(bad)
