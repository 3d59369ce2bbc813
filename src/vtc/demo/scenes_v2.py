"""The "clutter" scene family: many small things, only the question says which one matters.

The basic family (scenes.py) has one small object per scene, and it is also the patch least like all the others,
so a diversity method keeps it without reading the question. Here every scene has

- a textured background: per-pixel noise, muted blotches and scribbles, so many patches are unusual;
- two or three LARGE shapes of distinct kinds (salient distractors, the landmarks of position questions);
- 5-20 SMALL shapes, each inside one 16 px patch cell, in all eight colours: four colours occur exactly once
  (they can be named: "the small red object"), the other four 0-4 times (they can be counted);
- two SIGNS: a light plate with a 2-3 letter word from WORDS in a 3x5 pixel font drawn at 2x, inside one cell
  (2 letters) or two side by side (3 letters), the two words in two different ink colours (any palette colour
  but white, which would not show on the plate); each sits next to a different big shape;
- ANCHORS: one small shape and both signs lie in a 3-cell strip beside a big shape (above, below, left of or right
  of it: the strip spans the big shape's rows or columns); such a strip holds no other small shape or sign, so
  "the small shape above the big circle" and "what is written left of the big square" name exactly one thing.

A 10% budget (20 of 196 tokens) cannot keep every small cell, sign and large shape, so a compressor must read
the question to keep the right one. Questions (QTYPES), all about small things (``small_target`` is always true):

    shape_by_color     what shape is the small red object ?          -> circle   (a colour that occurs once)
    exists_by_attrs    is there a small red circle ?                 -> yes / no (a colour that occurs once)
    text_by_color      what is written on the blue sign ?            -> cat      (the TextVQA analogue)
    color_by_position  what color is the small shape above the big square ?   -> blue
    count_by_color     how many small blue shapes are there ?        -> one .. four
    text_by_position   what is written left of the big circle ?      -> cat

The benchmark's mix (QTYPE_WEIGHTS, what ``make_sample`` draws) is the first three: questions that name a small
thing by its attributes. The last three (a relation to a big shape, a count) are generated and checked as well,
for ``make_sample(seed, qtype)`` and training mixes, but the demo's language model, a 3-layer LM trained from
scratch in minutes, stays at chance on them in every recipe tried (issue 22's note; scripts/probe_demo_lm.py
finds the same on perfect image tokens), so a test split of them would measure only noise.

``answer_cells`` are the patch cells of the things the answer depends on (tests re-render the scene without them
and check that only those cells change). Everything is a pure function of the seed; splits are seed ranges
disjoint from the basic family's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLORS, GRID, PATCH, SHAPES, SIZE, Sample, cells_of, draw_shape

FAMILY = "clutter"
SPLITS = {"train": range(10_000_000, 11_000_000), "val": range(11_000_000, 11_100_000), "test": range(12_000_000, 12_100_000)}
QTYPES = ("shape_by_color", "exists_by_attrs", "text_by_color", "color_by_position", "count_by_color", "text_by_position")
QTYPE_WEIGHTS = (1, 1, 1, 0, 0, 0)  # the benchmark's mix: the attribute-named questions (module docstring)
RELATIONS = ("above", "below", "left of", "right of")
COUNTS = ("zero", "one", "two", "three", "four")
BIG_SIDE = (48, 72)
SMALL_SIDE = (10, 13)  # px, inset by >= 1 px inside one patch cell
STRIP = 3  # cells: how far beside a big shape "above / below / left of / right of" reaches
NAMED_COLORS = 4  # colours that occur exactly once among the small shapes
MAX_REPEAT = 4  # the other colours occur 0..MAX_REPEAT times
PLATE = (240, 240, 225)  # the sign plate: not a palette colour, so exact-colour checks never confuse it
INK_COLORS = tuple(c for c in COLORS if c != "white")  # white ink would not show on the plate
BACKGROUND_RANGE = (110, 215)  # every palette colour has a channel outside this, so the background never equals one

# 3x5 glyphs, drawn at 2x (6x10 px per letter, 1 px apart): the plate of "GO" is 15 px wide and fits one patch cell,
# a 3-letter plate (22 px) spans two cells side by side.
FONT = {
    "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "C": (".##", "#..", "#..", "#..", ".##"),
    "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "G": (".##", "#..", "#.#", "#.#", ".##"),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"),
    "M": ("#.#", "###", "###", "#.#", "#.#"),
    "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": ("###", "#.#", "#.#", "#.#", "###"),
    "P": ("##.", "#.#", "##.", "#..", "#.."),
    "S": (".##", "#..", ".#.", "..#", "##."),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"),
}
WORDS = ("go", "up", "hi", "ok", "cat", "dog", "sun", "map")
SCALE, GAP, MARGIN = 2, 1, 2  # glyph scale, px between letters, px of plate above and below the text (1 px beside)


@dataclass
class Item:
    """One drawn thing: a big or small shape, or a sign (``word`` set, ``color`` its ink, no shape)."""

    kind: str  # "big", "small" or "sign"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    color: str | None = None
    shape: str | None = None
    word: str | None = None
    anchor: tuple[int, str] | None = None  # (index of the big shape, relation) for anchored items

    @property
    def small(self) -> bool:  # the basic family's Shape.small, so captions and patch labels work on both
        return self.kind == "small"


@dataclass
class Scene:
    items: list[Item]
    background: tuple[int, int, int]
    noise_seed: int
    blotches: list[tuple[str, tuple[int, int, int, int], tuple[int, int, int]]] = field(default_factory=list)


@dataclass
class ClutterSample(Sample):
    scene: Scene | None = None


def split_seeds(split: str) -> range:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; use one of {sorted(SPLITS)}")
    return SPLITS[split]


# ----------------------------------------------------------------------------- drawing


def text_size(word: str) -> tuple[int, int]:
    """Plate width and height in px of a word."""
    return len(word) * 3 * SCALE + (len(word) - 1) * GAP + 2, 5 * SCALE + 2 * MARGIN


def draw_sign(draw: ImageDraw.ImageDraw, item: Item) -> None:
    x0, y0, x1, y1 = item.box
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=PLATE)
    x = x0 + 1
    for letter in item.word.upper():
        for row, bits in enumerate(FONT[letter]):
            for col, bit in enumerate(bits):
                if bit == "#":
                    px, py = x + col * SCALE, y0 + MARGIN + row * SCALE
                    draw.rectangle([px, py, px + SCALE - 1, py + SCALE - 1], fill=COLORS[item.color])
        x += 3 * SCALE + GAP


def render(scene: Scene, without=()) -> Image.Image:
    """The scene's image; ``without``: indices of items left out (tests check answer cells this way)."""
    image = Image.new("RGB", (SIZE, SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for kind, box, color in scene.blotches:
        if kind == "ellipse":
            draw.ellipse(box, fill=color)
        else:
            draw.line(box, fill=color, width=2)
    noise = 7.0 * np.random.default_rng(scene.noise_seed).standard_normal((SIZE, SIZE, 3), dtype=np.float32)
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, *BACKGROUND_RANGE).round().astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for i, item in enumerate(scene.items):
        if i in without:
            continue
        if item.kind == "sign":
            draw_sign(draw, item)
        else:
            draw_shape(draw, item)
    return image


# ----------------------------------------------------------------------------- layout


def _muted(rng: random.Random, base) -> tuple[int, int, int]:
    return tuple(min(BACKGROUND_RANGE[1], max(BACKGROUND_RANGE[0], c + rng.randint(-35, 35))) for c in base)


def _blotches(rng: random.Random, base) -> list:
    out = []
    for _ in range(rng.randint(18, 30)):
        w, h = rng.randint(6, 40), rng.randint(6, 40)
        x, y = rng.randint(-10, SIZE - 4), rng.randint(-10, SIZE - 4)
        out.append(("ellipse", (x, y, x + w, y + h), _muted(rng, base)))
    for _ in range(rng.randint(4, 8)):
        out.append(("line", tuple(rng.randint(0, SIZE - 1) for _ in range(4)), _muted(rng, base)))
    return out


def _clear(a, b, margin: int) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _place_bigs(rng: random.Random) -> list[Item]:
    for _ in range(100):
        bigs: list[Item] = []
        for shape in rng.sample(SHAPES, rng.randint(2, 3)):
            for _ in range(200):
                side = rng.randint(*BIG_SIDE)
                x, y = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
                box = (x, y, x + side, y + side)
                if all(_clear(box, b.box, 20) for b in bigs):
                    bigs.append(Item("big", box, rng.choice(list(COLORS)), shape))
                    break
        if len(bigs) >= 2:
            return bigs
    raise RuntimeError("could not place the big shapes")  # never seen; placement retries 100 x 200 times


def strip_cells(big: Item, relation: str) -> set[int]:
    """The patch cells "``relation`` the big shape": up to STRIP cells beside it, across its rows or columns."""
    cells = cells_of(big.box)
    rows = sorted({c // GRID for c in cells})
    cols = sorted({c % GRID for c in cells})
    if relation == "above":
        rows = range(max(0, rows[0] - STRIP), rows[0])
    elif relation == "below":
        rows = range(rows[-1] + 1, min(GRID, rows[-1] + 1 + STRIP))
    elif relation == "left of":
        cols = range(max(0, cols[0] - STRIP), cols[0])
    else:
        cols = range(cols[-1] + 1, min(GRID, cols[-1] + 1 + STRIP))
    return {r * GRID + c for r in rows for c in cols}


def _cell_box(cell: int, cells: int, width: int, height: int, inset: int, rng: random.Random):
    """A width x height box at a random offset inside ``cells`` side-by-side cells from ``cell``, ``inset`` px clear
    of their edges."""
    x = (cell % GRID) * PATCH + rng.randint(inset, cells * PATCH - width - inset)
    y = (cell // GRID) * PATCH + rng.randint(inset, PATCH - height - inset)
    return x, y, x + width, y + height


def _cell_rect(cell: int) -> tuple[int, int, int, int]:
    x, y = (cell % GRID) * PATCH, (cell // GRID) * PATCH
    return x, y, x + PATCH, y + PATCH


class _Layout:
    """The items placed so far, the cells they use, and the anchor strips (reserved for their one item)."""

    def __init__(self, bigs: list[Item]):
        self.items = list(bigs)
        self.used: set[int] = set()
        self.strips: list[set[int]] = []
        self.free = {c for c in range(GRID * GRID) if all(_clear(_cell_rect(c), b.box, 2) for b in bigs)}

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.used.update(cells_of(item.box))

    def anchor(self, rng: random.Random, cells: int, make, avoid_bigs=()) -> int | None:
        """Place ``make(first_cell, (big index, relation))`` (``cells`` wide) in a strip beside a big shape.

        The strip must be free of other items and of other strips; returns the big shape's index, or None.
        """
        options = [(i, rel) for i, b in enumerate(self.items) if b.kind == "big" and i not in avoid_bigs for rel in RELATIONS]
        rng.shuffle(options)
        for big, relation in options:
            strip = strip_cells(self.items[big], relation)
            if not strip or strip & self.used or any(s & strip for s in self.strips):
                continue
            starts = [c for c in sorted(strip) if all(
                c + k in strip and c + k in self.free and (c + k) // GRID == c // GRID for k in range(cells))]
            if starts:
                self.add(make(rng.choice(starts), (big, relation)))
                self.strips.append(strip)
                return big
        return None

    def scatter_cell(self, rng: random.Random) -> int | None:
        """A free cell outside every anchor strip, or None when the scene is full."""
        taken = self.used.union(*self.strips)
        cells = sorted(self.free - taken)
        return rng.choice(cells) if cells else None


def _small(rng: random.Random, cell: int, color: str, anchor=None) -> Item:
    side = rng.randint(*SMALL_SIDE)
    return Item("small", _cell_box(cell, 1, side, side, 1, rng), color, rng.choice(SHAPES), anchor=anchor)


def _sign(rng: random.Random, cell: int, word: str, anchor) -> Item:
    width, height = text_size(word)
    return Item("sign", _cell_box(cell, sign_cells(word), width, height, 0, rng), word=word, anchor=anchor)


def sign_cells(word: str) -> int:
    return 1 if text_size(word)[0] <= PATCH else 2


def make_scene(rng: random.Random) -> Scene:
    background = tuple(rng.randint(140, 190) for _ in range(3))
    blotches = _blotches(rng, background)
    noise_seed = rng.randrange(2**32)
    colors = list(COLORS)
    rng.shuffle(colors)
    named, repeated = colors[:NAMED_COLORS], colors[NAMED_COLORS:]
    small_colors = named + [c for c in repeated for _ in range(rng.randint(0, MAX_REPEAT))]
    rng.shuffle(small_colors)
    words = rng.sample(WORDS, 2)
    for _ in range(50):
        layout = _Layout(_place_bigs(rng))
        first = layout.anchor(rng, sign_cells(words[0]), lambda cell, at: _sign(rng, cell, words[0], at))
        if first is None:
            continue
        second = layout.anchor(rng, sign_cells(words[1]), lambda cell, at: _sign(rng, cell, words[1], at), avoid_bigs=(first,))
        if second is None or layout.anchor(rng, 1, lambda cell, at: _small(rng, cell, small_colors[0], at)) is None:
            continue
        for color in small_colors[1:]:
            cell = layout.scatter_cell(rng)
            if cell is None:
                break
            layout.add(_small(rng, cell, color))
        signs = [item for item in layout.items if item.kind == "sign"]
        for sign, ink in zip(signs, rng.sample(INK_COLORS, len(signs))):  # drawn last: the layout's draws stay as they were
            sign.color = ink
        return Scene(layout.items, background, noise_seed, blotches)
    raise RuntimeError("could not lay out a clutter scene")  # never seen: one try in a few fails


# ----------------------------------------------------------------------------- questions


def _smalls(items: list[Item], color: str | None = None) -> list[int]:
    return [i for i, it in enumerate(items) if it.kind == "small" and (color is None or it.color == color)]


def named_colors(items: list[Item]) -> list[str]:
    """Colours that exactly one small shape has (it can be named by its colour alone)."""
    return [c for c in COLORS if len(_smalls(items, c)) == 1]


def make_question(items: list[Item], qtype: str, rng: random.Random) -> tuple[str, str, list[int]]:
    """(question, answer, indices of the items the answer depends on) for a scene's items."""
    if qtype in ("shape_by_color", "exists_by_attrs"):
        color = rng.choice(named_colors(items))
        (target,) = _smalls(items, color)
        shape = items[target].shape
        if qtype == "shape_by_color":
            return f"what shape is the small {color} object ?", shape, [target]
        if rng.random() < 0.5:
            return exists_question(color, shape), "yes", [target]
        return exists_question(color, rng.choice([s for s in SHAPES if s != shape])), "no", [target]
    if qtype == "color_by_position":
        (target,) = [i for i in _smalls(items) if items[i].anchor]
        return f"what color is the small shape {position(items, target)} ?", items[target].color, [target]
    if qtype == "count_by_color":
        present = [c for c in COLORS if _smalls(items, c)]
        repeated = [c for c in present if c not in named_colors(items)]
        color = rng.choice(repeated if repeated and rng.random() < 0.75 else present)
        targets = _smalls(items, color)
        return f"how many small {color} shapes are there ?", COUNTS[len(targets)], targets
    if qtype in ("text_by_position", "text_by_color"):
        target = rng.choice([i for i, it in enumerate(items) if it.kind == "sign"])
        if qtype == "text_by_color":
            return sign_question(items[target].color), items[target].word, [target]
        return f"what is written {position(items, target)} ?", items[target].word, [target]
    raise ValueError(f"unknown question type '{qtype}' for the {FAMILY} family; use one of {QTYPES}")


def sign_question(color: str) -> str:
    return f"what is written on the {color} sign ?"


def exists_question(color: str, shape: str) -> str:
    return f"is there a small {color} {shape} ?"


def position(items: list[Item], index: int) -> str:
    big, relation = items[index].anchor
    return f"{relation} the big {items[big].shape}"


def make_sample(seed: int, qtype: str | None = None) -> ClutterSample:
    """The clutter scene and question of ``seed`` (question type drawn from the seed unless given)."""
    rng = random.Random(seed)
    scene = make_scene(rng)
    qtype = qtype or rng.choices(QTYPES, weights=QTYPE_WEIGHTS)[0]
    question, answer, targets = make_question(scene.items, qtype, rng)
    cells = sorted({c for i in targets for c in cells_of(scene.items[i].box)})
    return ClutterSample(seed, render(scene), question, answer, qtype, True, cells, scene.items, scene=scene)


def caption(item: Item) -> str:
    if item.kind == "sign":
        return f"{item.color} sign {item.word}"
    return f"{'small' if item.small else 'big'} {item.color} {item.shape}"


EXTRA_VOCAB = sorted(set("written on sign above below left right of".split() + list(COUNTS) + list(WORDS)))
"""Words the clutter family adds to the basic family's VOCAB (a tokenizer for both families holds both)."""
