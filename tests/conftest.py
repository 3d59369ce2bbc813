"""Shared fixtures: tiny random checkpoints saved and loaded back through from_pretrained."""

import numpy as np
import pytest
import torch
from PIL import Image

from vtc.testing import save_tiny_clip, save_tiny_llava

torch.set_num_threads(1)  # tests run beside other work on 2 cores; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llava(root / "llava"), save_tiny_clip(root / "clip")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dirs):
    from vtc.pipeline import Pipeline

    llava, clip = tiny_dirs
    return Pipeline.from_pretrained(llava, clip=clip)


def random_image(seed: int, size=(40, 52)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def images():
    return [random_image(i) for i in range(3)]
