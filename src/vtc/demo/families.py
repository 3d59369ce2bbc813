"""The benchmark's scene families by name: "basic" (scenes.py, one small object) and "clutter" (scenes_v2.py)."""

from __future__ import annotations

import random

from . import scenes, scenes_v2

FAMILIES = ("basic", "clutter")


def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown scene family '{family}'; use one of {FAMILIES}")
    return scenes if family == "basic" else scenes_v2


def split_seeds(family: str, split: str) -> range:
    return family_module(family).split_seeds(split)


def make_sample(family: str, seed: int, qtype: str | None = None):
    return family_module(family).make_sample(seed, qtype)


def training_scene(family: str, seed: int):
    """(image, objects, rng) of a seed: the rng continues where the scene left it, for questions on that image."""
    rng = random.Random(seed)
    if family == "basic":
        image, objects = scenes.make_scene(rng)
        return image, objects, rng
    scene = family_module(family).make_scene(rng)
    return scenes_v2.render(scene), scene.items, rng


def vocabulary(families) -> list[str]:
    """The tokenizer words for these families: the basic family's VOCAB first (its ids never move), then additions."""
    words = list(scenes.VOCAB)
    if "clutter" in families:
        words += [w for w in scenes_v2.EXTRA_VOCAB if w not in words]
    return words
