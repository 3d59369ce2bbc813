"""Official benchmark metrics on hand-worked cases, each read off the official evaluation code's rules
(VQA's vqaEval.py, LLaVA's eval_pope, MME's calculation.py, MMBench's CircularEval), not off vtc's code."""

import pytest

from vtc.bench import metrics

# ----------------------------------------------------------------------------- VQA answer normalisation


@pytest.mark.parametrize(
    "raw,normalised",
    [
        # punctuation touching a space is deleted everywhere in the answer, otherwise replaced by a space
        ("red,blue , green", "redblue green"),
        ("red,blue", "red blue"),
        ("red,blue, green", "redblue green"),  # only after a comma
        ("red,blue ,green", "redblue green"),  # only before a comma
        ("red,blue\n,green", "redblue green"),  # newlines and tabs count as spaces
        ("red,blue\t,green", "redblue green"),
        ("black/white", "black white"),
        ("(left)", "left"),
        ('say "hi"!', "say hi"),
        ("a-b", "b"),  # '-' -> ' ', then the article 'a' goes
        ("x_y;z", "x y z"),
        ("[1]+{2}=<3>@`\\", "1 2 3"),
        # a comma between digits: every punctuation mark is deleted, none becomes a space
        ("1,000-2", "10002"),
        ("1,000", "1000"),
        # periods go unless a digit follows
        ("u.s.a.", "usa"),
        ("3.5", "3.5"),
        ("2.", "2"),
        ("3. 5", "3 5"),
        # number words, articles, apostrophe-less contractions; case and whitespace
        ("Two dogs.", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("zero", "0"),
        ("the Cat", "cat"),
        ("an apple a day", "apple day"),
        ("dont know", "don't know"),
        ("Whats up", "what's up"),
        ("yall'll", "y'all'll"),
        ("  Yes\tno\nmaybe  ", "yes no maybe"),
        ("", ""),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert metrics.normalize_vqa(raw) == normalised


@pytest.mark.parametrize("matches,accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_matching_humans(matches, accuracy):
    # the well-known VQA values: 1 human of 10 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert metrics.vqa_accuracy("Cat.", answers) == pytest.approx(accuracy)


def test_vqa_accuracy_normalises_both_sides_and_needs_answers():
    assert metrics.vqa_accuracy("the two", ["2", "two", "Two."] + ["x"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("red", ["red"]) == 0.0  # one human answer: no other human left to agree
    assert metrics.vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="^VQA accuracy needs at least one human answer$"):
        metrics.vqa_accuracy("red", [])


def test_gqa_exact_match():
    assert metrics.exact_match(" Yes. ", "yes") == 1.0
    assert metrics.exact_match("Left .", "left") == 1.0
    assert metrics.exact_match("yes.", "yes") == 1.0 and metrics.exact_match("yes", "Yes.") == 1.0
    assert metrics.exact_match("on the left", "left") == 0.0
    assert metrics.exact_match("3.5", "35") == 0.0


# ----------------------------------------------------------------------------- POPE (LLaVA's eval_pope)


@pytest.mark.parametrize(
    "prediction,label",
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is no dog.", "no"),
        ("No.", "no"),
        ("no", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. There is no cat, though.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),
        ("I see nothing", "yes"),  # whole words only
        ("NO", "yes"),  # the official check is case-sensitive: 'No', 'no', 'not'
        ("Not at all", "yes"),
        ("no,there", "yes"),  # commas are deleted, not turned into spaces
        ("there is,no", "yes"),
        ("yes, no", "no"),
        ("No, it is", "no"),  # 'No,' is the word 'No' once the comma is deleted
        ("there is\nno dog", "yes"),  # split on single spaces only: 'is\nno' is one word
        ("", "yes"),
    ],
)
def test_pope_reads_yes_no_as_eval_pope(prediction, label):
    assert metrics.yes_no(prediction) == label


def test_pope_scores_by_hand():
    pairs = [("Yes", "yes")] * 3 + [("No", "yes")] * 1 + [("Yes", "no")] * 2 + [("No", "no")] * 4
    # tp 3, fn 1, fp 2, tn 4: acc 7/10; precision 3/5; recall 3/4; F1 2pr/(p+r) = 0.9/1.35 = 2/3; yes 5/10
    assert metrics.pope_scores(pairs) == {"accuracy": 70.0, "precision": 60.0, "recall": 75.0, "f1": 66.67, "yes_ratio": 50.0}
    # nothing predicted yes: precision 0 by convention (no division by zero), F1 0
    assert metrics.pope_scores([("No", "yes"), ("No", "no")]) == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    # no positive label: recall 0
    assert metrics.pope_scores([("Yes", "no")]) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 100.0}
    assert metrics.pope_scores([]) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    # one third precision: rounding to 2 decimals
    third = [("Yes", "yes"), ("Yes", "no"), ("Yes", "no")]
    assert metrics.pope_scores(third) == {"accuracy": 33.33, "precision": 33.33, "recall": 100.0, "f1": 50.0, "yes_ratio": 100.0}


# ----------------------------------------------------------------------------- MME (its calculation.py)


@pytest.mark.parametrize(
    "prediction,label",
    [("Yes", "yes"), ("no", "no"), ("Yes.", "yes"), ("YES, it is", "yes"), ("No, there is none", "no"),
     ("not sure", "no"),  # 'no' within the first 4 characters
     ("none", "no"), ("There is a dog", "other"), ("I think yes", "other"), ("oh no", "other"), ("", "other")],
)
def test_mme_reads_an_answer_as_calculation_py(prediction, label):
    assert metrics.mme_label(prediction) == label


def test_mme_scores_by_hand():
    rows = [
        # existence: 3 images x 2 questions; right: a both, b one, c none -> acc 3/6, acc+ 1/3 -> 50 + 33.33 = 83.33
        ("existence", "a", "Yes", "yes"), ("existence", "a", "No", "No"),
        ("existence", "b", "Yes", "yes"), ("existence", "b", "There is one", "no"),  # 'other' is wrong
        ("existence", "c", "There is one", "yes"), ("existence", "c", "Yes", "no"),
        # OCR: 1 image, both right -> 200
        ("OCR", "d", "yes", "Yes"), ("OCR", "d", "no", "No"),
        # code_reasoning: 2 images; right 3 of 4, acc+ 1/2 -> 75 + 50 = 125
        ("code_reasoning", "e", "No", "no"), ("code_reasoning", "e", "no", "no"),
        ("code_reasoning", "f", "Yes", "yes"), ("code_reasoning", "f", "Yes", "no"),
        # text_translation: 3 images; right 3 of 6, acc+ 1/3 -> 50 + 33.33 = 83.33
        ("text_translation", "g", "Yes", "yes"), ("text_translation", "g", "Yes", "no"),
        ("text_translation", "h", "Yes", "yes"), ("text_translation", "h", "No", "no"),
        ("text_translation", "i", "No", "yes"), ("text_translation", "i", "no", "yes"),
    ]
    out = metrics.mme_scores(rows)
    assert out["subtasks"] == {"existence": 83.33, "OCR": 200.0, "code_reasoning": 125.0, "text_translation": 83.33}
    assert out["perception"] == 283.33 and out["cognition"] == 208.33
    assert metrics.mme_scores([]) == {"perception": 0, "cognition": 0, "subtasks": {}}


# ----------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "prediction,letter",
    [("B", "B"), ("b", "B"), ("(C) a cat", "C"), ("D.", "D"), ("A) red", "A"), ("  C", "C"), ("[A]", "A"),
     ("E", None), ("the answer is A", None), ("AB", None), ("", None), ("Apple", None)],
)
def test_option_letter(prediction, letter):
    assert metrics.option_letter(prediction, "ABCD") == letter


def test_circular_accuracy_counts_a_question_once_and_only_if_every_pass_is_right():
    rows = [(5, True), (1_000_005, True), (2_000_005, True), (3_000_005, True),  # all 4 passes right
            (6, True), (1_000_006, False),  # one pass wrong
            (7, True)]  # a question without circular copies
    assert metrics.circular_accuracy(rows) == pytest.approx(100 * 2 / 3)
    assert metrics.circular_accuracy([]) == 0.0
    assert metrics.circular_accuracy([(3, True)]) == 100.0
    assert metrics.circular_accuracy([(999_999, False), (1_999_999, True)]) == 0.0
