"""Synthetic scenes and questions whose answers hide in small, non-salient objects.

Every scene: a plain light background, two or three LARGE shapes of distinct
kinds (the visually salient distractors) and one SMALL shape of 11-15 px drawn
inside a single 16 px patch cell (its answer lives in one image token). Most questions
ask about the small object, so a compressor that keeps only the salient tokens
loses the answer, while the question's words ("small", its colour or shape)
point at it. Everything is a pure function of the seed; splits are seed ranges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SIZE = 224
PATCH = 16
GRID = SIZE // PATCH
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
SMALL_SIDE = (11, 15)  # px, drawn inside a single 16 px patch cell
BIG_SIDE = (56, 84)
SPLITS = {"train": range(0, 1_000_000), "val": range(1_000_000, 1_100_000), "test": range(2_000_000, 2_100_000)}
QTYPES = ("small_color", "small_shape", "small_exists", "big_color", "big_count")


@dataclass
class Shape:
    color: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    small: bool


@dataclass
class Sample:
    seed: int
    image: Image.Image
    question: str
    answer: str
    qtype: str
    small_target: bool
    answer_cells: list[int] = field(default_factory=list)
    objects: list[Shape] = field(default_factory=list)


def split_seeds(split: str) -> range:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; use one of {sorted(SPLITS)}")
    return SPLITS[split]


def cells_of(box: tuple[int, int, int, int]) -> list[int]:
    """Raster indices of the patches a box overlaps."""
    x0, y0, x1, y1 = box
    cols = range(x0 // PATCH, min(GRID - 1, (x1 - 1) // PATCH) + 1)
    rows = range(y0 // PATCH, min(GRID - 1, (y1 - 1) // PATCH) + 1)
    return [r * GRID + c for r in rows for c in cols]


def draw_shape(draw: ImageDraw.ImageDraw, obj: Shape, fill=None) -> None:
    x0, y0, x1, y1 = obj.box
    fill = COLORS[obj.color] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def _overlaps(a, b, margin=4) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(rng: random.Random, side: int, taken: list) -> tuple[int, int, int, int]:
    for _ in range(200):
        x, y = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
        box = (x, y, x + side, y + side)
        if not any(_overlaps(box, t) for t in taken):
            return box
    return box


def _place_in_cell(rng: random.Random, side: int, taken: list) -> tuple[int, int, int, int]:
    """A box of ``side`` px inside one patch cell (at a random offset), clear of the ``taken`` boxes."""
    for _ in range(400):
        cx, cy = rng.randrange(GRID), rng.randrange(GRID)
        x, y = cx * PATCH + rng.randint(0, PATCH - side), cy * PATCH + rng.randint(0, PATCH - side)
        box = (x, y, x + side, y + side)
        if not any(_overlaps(box, t) for t in taken):
            return box
    return box


def make_scene(rng: random.Random) -> tuple[Image.Image, list[Shape]]:
    background = tuple(rng.randint(170, 215) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    objects: list[Shape] = []
    for shape in rng.sample(SHAPES, rng.randint(2, 3)):  # distinct shapes: "the big circle" is unambiguous
        box = _place(rng, rng.randint(*BIG_SIDE), [o.box for o in objects])
        objects.append(Shape(rng.choice(list(COLORS)), shape, box, small=False))
    box = _place_in_cell(rng, rng.randint(*SMALL_SIDE), [o.box for o in objects])
    objects.append(Shape(rng.choice(list(COLORS)), rng.choice(SHAPES), box, small=True))
    for obj in objects:
        draw_shape(draw, obj)
    return image, objects


def exists_question(color: str, shape: str) -> str:
    return f"is there a small {color} {shape} ?"


def big_color_question(big: Shape) -> str:
    return f"what color is the big {big.shape} ?"


def make_question(objects: list[Shape], qtype: str, rng: random.Random) -> tuple[str, str, list[Shape]]:
    """(question, answer, the objects the answer depends on) for a scene's objects."""
    small, bigs = objects[-1], objects[:-1]
    if qtype == "small_color":
        return f"what color is the small {small.shape} ?", small.color, [small]
    if qtype == "small_shape":
        return f"what shape is the small {small.color} object ?", small.shape, [small]
    if qtype == "small_exists":
        color, shape, answer = small.color, small.shape, "yes"
        if rng.random() < 0.5:
            while (color, shape) == (small.color, small.shape):
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            answer = "no"
        return exists_question(color, shape), answer, [small]
    if qtype == "big_color":
        big = rng.choice(bigs)
        return big_color_question(big), big.color, [big]
    if qtype == "big_count":
        return "how many big shapes are there ?", ["zero", "one", "two", "three"][len(bigs)], bigs
    raise ValueError(f"unknown question type '{qtype}'")


def make_sample(seed: int, qtype: str | None = None) -> Sample:
    """The scene and question of ``seed`` (question type drawn from the seed unless given)."""
    rng = random.Random(seed)
    image, objects = make_scene(rng)
    qtype = qtype or rng.choices(QTYPES, weights=(3, 3, 2, 1, 1))[0]
    question, answer, target = make_question(objects, qtype, rng)
    cells = sorted({c for obj in target for c in cells_of(obj.box)})
    return Sample(seed, image, question, answer, qtype, qtype.startswith("small"), cells, objects)


def caption(obj: Shape) -> str:
    return f"{'small' if obj.small else 'big'} {obj.color} {obj.shape}"


VOCAB = sorted(
    set(
        "what color is the small big shape object is there a how many shapes are ? yes no zero one two three".split()
        + list(COLORS)
        + list(SHAPES)
    )
)
