"""Do the demo tower's patch features carry what the clutter questions ask? A linear probe per attribute.

    python scripts/probe_demo_features.py --clip src/vtc/demo/checkpoint/clip [--train 2000] [--test 500]

Issue 22's diagnosis: the LLaVA trained on both families answers clutter questions at 40% with full tokens. That
is either the tower (its layer -2 patch states, the LLaVA's image tokens, do not carry a small object's colour,
shape or a sign's word) or the language model (it cannot look them up). This script separates the two: it
computes the tower's layer -2 state of every small shape's cell and every sign's first cell on clutter training
scenes, fits a logistic regression per attribute (colour, shape, word), and reports its accuracy on other scenes
(the test split's seeds). High probe accuracy with a low LLaVA accuracy points at the language model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import CLIPModel

from vtc.demo import scenes_v2
from vtc.demo.families import training_scene
from vtc.demo.scenes import cells_of
from vtc.demo.train import pixels


@torch.no_grad()
def cell_states(tower, seeds: range, batch: int = 64) -> tuple[np.ndarray, dict[str, list]]:
    """Layer -2 states of the small shapes' and signs' cells, and their labels per attribute (None where n/a)."""
    rows, labels = [], {"color": [], "shape": [], "word": []}
    for start in range(0, len(seeds), batch):
        data = [training_scene("clutter", s) for s in seeds[start : start + batch]]
        states = tower(pixel_values=pixels([d[0] for d in data]), output_hidden_states=True).hidden_states[-2][:, 1:]
        for b, (_, items, _) in enumerate(data):
            for item in items:
                if item.kind == "big":
                    continue
                rows.append(states[b, cells_of(item.box)[0]].numpy())
                labels["color"].append(item.color)
                labels["shape"].append(item.shape)
                labels["word"].append(item.word)
    return np.stack(rows), labels


def probe(train_x, train_y, test_x, test_y) -> float:
    keep_train = [i for i, y in enumerate(train_y) if y is not None]
    keep_test = [i for i, y in enumerate(test_y) if y is not None]
    model = LogisticRegression(max_iter=2000).fit(train_x[keep_train], [train_y[i] for i in keep_train])
    return 100.0 * model.score(test_x[keep_test], [test_y[i] for i in keep_test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", type=Path, required=True, help="a trained demo CLIP folder")
    parser.add_argument("--train", type=int, default=2000, help="clutter training scenes for the probes")
    parser.add_argument("--test", type=int, default=500, help="clutter test scenes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tower = CLIPModel.from_pretrained(args.clip).vision_model.eval()
    train_x, train_y = cell_states(tower, scenes_v2.split_seeds("train")[:args.train])
    test_x, test_y = cell_states(tower, scenes_v2.split_seeds("test")[:args.test])
    result = {attr: round(probe(train_x, train_y[attr], test_x, test_y[attr]), 1) for attr in ("color", "shape", "word")}
    result["cells"] = {"train": len(train_x), "test": len(test_x)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
