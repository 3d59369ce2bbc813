"""Official metrics of the standard VQA benchmarks, written from each benchmark's evaluation rules.

* VQAv2 / TextVQA: VQA accuracy. Answers are normalised as the official VQA evaluation
  (vqaEval.py) does: punctuation removed or spaced, periods not between digits dropped,
  number words to digits, articles dropped, apostrophe-less contractions restored.
  Accuracy of a prediction = mean over the 10 leave-one-out subsets of the 10 human
  answers of min(1, #matches / 3). The official script normalises the prediction only
  when the humans disagree; like EvalAI's answer processor (and lmms-eval) we always
  normalise it.
* GQA: exact match after lower-casing and stripping (LLaVA's GQA evaluation).
* POPE: yes/no as LLaVA's eval_pope reads it: the first sentence, commas deleted, split
  on spaces; the word "No", "no" or "not" -> no, else yes (case-sensitive, as there);
  accuracy, precision, recall, F1 and yes-ratio per split.
* MME: the answer read as MME's calculation.py does (lower-cased; "yes" / "no", else the
  first 4 characters containing "yes" or "no", else "other", which is wrong for both);
  per subtask, acc (per question) + acc+ (every question of an image right), x100 each;
  perception = sum over its 10 subtasks, cognition = sum over its 4.
* ScienceQA-IMG / MMBench: the option letter; MMBench's circular evaluation counts a
  question right only if every circular shift of its options is answered right.
"""

from __future__ import annotations

import re
from collections import defaultdict

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa(answer: str) -> str:
    """The official VQA answer normalisation."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy against the human answers (normally 10): leave-one-out mean of min(1, matches / 3)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """GQA: lower-cased, stripped, trailing period dropped, equal."""
    clean = lambda s: s.strip().lower().rstrip(".").strip()  # noqa: E731
    return float(clean(prediction) == clean(answer))


def yes_no(prediction: str) -> str:
    """POPE's reading of a free-form answer (LLaVA's eval_pope): the words of its first sentence,
    commas deleted, split on single spaces; 'No', 'no' or 'not' among them -> 'no', else 'yes'."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def mme_label(prediction: str) -> str:
    """MME's reading of a free-form answer (its calculation.py): 'yes', 'no' or 'other'.

    calculation.py first takes an exact 'yes' / 'no', which the 4-character prefix rule below already covers."""
    prefix = prediction.lower()[:4]
    if "yes" in prefix:
        return "yes"
    return "no" if "no" in prefix else "other"


def pope_scores(pairs: list[tuple[str, str]]) -> dict:
    """(prediction, label) pairs of one split -> accuracy, precision, recall, F1 (positive = yes), yes-ratio, x100."""
    tp = fp = tn = fn = 0
    for pred, label in pairs:
        p = yes_no(pred)
        if p == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = max(1, tp + fp + tn + fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {k: round(100 * v, 2) for k, v in
            {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": (tp + fp) / n}.items()}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(rows: list[tuple[str, str, str, str]]) -> dict:
    """(subtask, image, prediction, yes/no label) rows -> per-subtask acc + acc+ and the perception / cognition sums."""
    per_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for task, image, pred, label in rows:
        per_task[task][image].append(mme_label(pred) == label.strip().lower())
    subtasks = {}
    for task, images in per_task.items():
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        subtasks[task] = round(100 * (acc + acc_plus), 2)
    return {
        "perception": round(sum(v for k, v in subtasks.items() if k in MME_PERCEPTION), 2),
        "cognition": round(sum(v for k, v in subtasks.items() if k in MME_COGNITION), 2),
        "subtasks": subtasks,
    }


def option_letter(prediction: str, letters: str) -> str | None:
    """The option a free-form answer picks: a leading letter ('B', 'B.', '(B)', 'B) ...'), else None."""
    match = re.match(r"^\W*([A-Za-z])(?:\W|$)", prediction.strip())
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def circular_accuracy(rows: list[tuple[int, bool]]) -> float:
    """MMBench CircularEval: (question index, correct) over all circular passes; a question counts if every pass is right."""
    groups: dict[int, list[bool]] = defaultdict(list)
    for index, ok in rows:
        groups[index % 1_000_000].append(ok)
    return 100.0 * sum(all(v) for v in groups.values()) / max(1, len(groups))
