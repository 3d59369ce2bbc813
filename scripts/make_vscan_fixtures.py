"""Parity fixtures: the official VScan vision stage (scans + merging) run on small seeded tensors.

    python scripts/make_vscan_fixtures.py --snapshot PATH [--out tests/fixtures/vscan/cases.pt]

PATH is a local snapshot of the official repository (https://github.com/Tencent/SelfEvolvingAgent, VScan/,
MIT licence per its README): a checkout, or a git directory without a work tree (read with ``git show``).
Nothing is fetched. The official code is loaded from it at run time (ast + exec), never copied into vtc:

  * ``llava``: ``LlavaMetaForCausalLM`` (VScan/llava/model/llava_arch.py), whose ``encode_images`` runs
    the whole LLaVA-1.5 vision stage (``window_cls_selection``, the global top-k, ``token_merging``). Stand-ins,
    outside the official code: a vision tower that returns fixed features and 24 layers of (B, H, N) CLS
    attention rows (only layers 5 and -2 are read; the others are zeros), ``get_model()``,
    ``get_visual_token_num()`` and ``mm_projector`` = identity (so similarity and means are of the
    given features: vtc's test passes the same tensor as its ``features`` and ``projected``). N = 576 (24 x 24,
    the official assertion). Stored: the two attention maps, the features, and per T the official keep
    mask and output rows (``image_features[index_mask]``, raster order). Budgets where the official code
    keeps fewer than T (the local share not a multiple of 16) are listed in ``shortfalls``.
  * ``grid``: ``window_selection`` and ``token_merging`` (VScan/qwen/model/qwen2_5_vl_utils.py), the
    official rule on grids of any size, run on seeded (N,) maps and (N, D) features; the global scan
    between them is the two lines of ``Qwen2_5_VLForConditionalGeneration_X.forward`` (local picks' scores
    set to 0, then ``torch.topk``), written here as that forward runs them. Stored: inputs, per T the kept
    indices (sorted) and merged rows.
Everything runs on the CPU in fp32 (features fp16-representable; score maps float64 with no ties); the official code is not modified.
tests/test_vscan.py compares vtc's ``vscan`` with them.
"""

from __future__ import annotations

import argparse
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_recoverable_fixtures import load_definitions, official_llava_model, read_snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADS, LAYERS, D = 4, 24, 8
LLAVA_BUDGETS = [32, 64, 96, 192, 288, 100]  # 100: local share 50, not a multiple of 16 windows
LLAVA_SEEDS = [0, 1]
GRIDS = [((10, 14), [7, 20, 35, 70]), ((17, 23), [13, 50, 100, 195]), ((24, 24), [100, 150])]
WINDOW_QWEN = 4  # the Qwen2.5-VL default; the 24 x 24 cases use LLaVA's 6
GRID_SEEDS = [3, 4]


def official(snapshot: Path) -> dict:
    ns: dict = {"torch": torch, "nn": nn, "F": F, "ABC": ABC, "abstractmethod": abstractmethod}
    load_definitions(read_snapshot(snapshot, "VScan/llava/model/llava_arch.py"), {"LlavaMetaForCausalLM"}, ns)
    load_definitions(read_snapshot(snapshot, "VScan/qwen/model/qwen2_5_vl_utils.py"), {"token_merging", "window_selection"}, ns)
    return ns


class TensorTower:
    """Stands in for the official CLIPVisionTower: fixed (B, N, C) features and (LAYERS, B, H, N) CLS rows."""

    def __init__(self, features: torch.Tensor, attentions: torch.Tensor):
        self.features, self.attentions = features, attentions

    def __call__(self, images):
        return self.features.clone(), self.attentions.clone()


def seeded(seed: int, shape: tuple[int, ...], scale: float = 1.0, half: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    return values.half().float() if half else values  # score maps stay float64: no ties


def distinct(scores: torch.Tensor) -> bool:
    """No two equal scores in a row: the official topk/argsort order of ties is unspecified."""
    ranked = scores.sort(dim=-1).values
    return bool((ranked[..., 1:] > ranked[..., :-1]).all())


def llava_cases(ns: dict) -> tuple[list[dict], list[dict]]:
    cases, shortfalls = [], []
    n = 576
    for seed in LLAVA_SEEDS:
        features = seeded(100 + seed, (2, n, D))
        shallow = seeded(200 + seed, (2, HEADS, n), 2.0, half=False).softmax(-1)  # float64: fp16 or fp32 could tie scores
        deep = seeded(300 + seed, (2, HEADS, n), 2.0, half=False).softmax(-1)
        assert all(distinct(m.mean(1)) for m in (shallow, deep))
        attentions = torch.zeros(LAYERS, 2, HEADS, n)
        attentions[5], attentions[-2] = shallow, deep
        budgets, masks, rows = [], [], []
        for t in LLAVA_BUDGETS:
            with torch.no_grad():
                out, mask, _ = official_llava_model(ns["LlavaMetaForCausalLM"], TensorTower(features, attentions), visual_token_num=t).encode_images(None)
            kept = mask.sum(1).tolist()
            if kept != [t, t]:
                shortfalls.append({"seed": seed, "t": t, "kept": kept})
                continue
            budgets.append(t)
            masks.append(mask)
            rows.append(out[mask].view(2, t, D))
        cases.append({"seed": seed, "features": features.half(), "shallow": shallow, "deep": deep,
                      "budgets": budgets, "masks": masks, "rows": rows})
        print(f"llava seed {seed}: budgets {budgets}")
    return cases, shortfalls


def qwen_rule(ns: dict, local_map, global_map, features, grid, t: int, window: int):
    """The official Qwen2.5-VL vision stage: window_selection, the forward's global top-k, token_merging."""
    thw = torch.tensor([[1, 2 * grid[0], 2 * grid[1]]])
    local = ns["window_selection"](local_map.clone(), t // 2, thw, window_size=window)
    global_map = global_map.clone()
    global_map[local] = 0  # the forward's "avoid repetition"
    chosen = torch.cat((local, torch.topk(global_map, t - t // 2).indices), dim=0)
    chosen = torch.sort(chosen, dim=0)[0]
    return chosen.long(), ns["token_merging"](features.clone(), chosen, scaling=1)


def grid_cases(ns: dict) -> list[dict]:
    cases = []
    for grid, budgets in GRIDS:
        n = grid[0] * grid[1]
        window = 6 if grid == (24, 24) else WINDOW_QWEN
        for seed in GRID_SEEDS:
            features = seeded(400 + seed, (n, D))
            local_map = seeded(500 + seed, (n,), 2.0, half=False).softmax(-1)
            global_map = seeded(600 + seed, (n,), 2.0, half=False).softmax(-1)
            assert distinct(local_map) and distinct(global_map)
            kept, rows = [], []
            for t in budgets:
                with torch.no_grad():
                    index, merged = qwen_rule(ns, local_map, global_map, features, grid, t, window)
                kept.append(index)
                rows.append(merged)
            cases.append({"grid": grid, "window": window, "seed": seed, "features": features.half(),
                          "local": local_map, "global": global_map, "budgets": budgets,
                          "kept": kept, "rows": rows})
            print(f"grid {grid} seed {seed}: budgets {budgets}")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "vscan" / "cases.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ns = official(args.snapshot)
    llava, shortfalls = llava_cases(ns)
    for s in shortfalls:
        print(f"official LLaVA code keeps fewer than T: seed {s['seed']} T={s['t']}: kept {s['kept']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"llava": llava, "shortfalls": shortfalls, "grid": grid_cases(ns)}, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
