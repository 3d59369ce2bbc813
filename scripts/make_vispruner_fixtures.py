"""Parity fixtures: the official VisPruner selection run on small seeded tensors and on a tiny CLIP tower.

    python scripts/make_vispruner_fixtures.py --snapshot PATH [--out tests/fixtures/vispruner/cases.pt]

PATH is a local snapshot of the official repository (https://github.com/Theia-4869/VisPruner, Apache-2.0):
a checkout, or a git directory without a work tree (read with ``git show HEAD:...``). Nothing is fetched.
The official code is loaded from it at run time (ast + exec), never copied into vtc:
``LlavaMetaForCausalLM`` (llava/model/llava_arch.py), whose ``encode_images`` is the whole selection, and
``CLIPVisionTower`` (llava/model/multimodal_encoder/clip_encoder.py), whose ``forward``/``feature_select``
choose the layer's features and CLS attention. Stand-ins, outside the official code: ``get_model()``,
``get_visual_token_num()`` and ``get_important_ratio()`` (the model class of llava_llama.py only stores
these), and ``mm_projector`` = identity (so the returned rows are the kept features, which vtc returns
before its projector). Everything runs on the CPU in fp32; the official code is not modified.

Two kinds of case:
  * ``tensors``: (B, N, D) features and (B, H, N) attention rows, seeded (half of them clustered, so that
    duplicates exist), for several N, budgets T and important ratios; the official ``encode_images`` gets a
    vision tower stand-in that returns them. Stored: the inputs, and per (T, ratio) the official keep mask.
    Budgets where the official loop raises, or keeps another count than T, are listed in ``failures``.
  * ``tower``: a seeded tiny CLIP (N = 64 patches, 3 layers) run by the official ``CLIPVisionTower`` with
    eager attention (output_attentions, select_layer -2): stored are its config, weights (fp16 values), the
    pixel values, the official masks and the official feature rows (``encode_images``'s output with the
    identity projector); the test runs vtc's adapter (SDPA, q/k hooks) on them.
tests/test_vispruner.py compares vtc's ``vispruner`` with them.
"""

from __future__ import annotations

import argparse
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_recoverable_fixtures import load_definitions, official_llava_model, read_snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADS = 4
# (N, D, budgets T, important ratios, extra (T, ratio) pairs): even and odd T, splits rounding down
# (0.4 * 32 = 12.8 -> 12), ratio 0 (all diverse) and 1 (all important), T = N; T = 56 at 0.84 on 64 patches
# reaches the official loop's odd round that drops one token too many (R = 17, r = 8).
SHAPES = [
    (64, 32, [8, 16, 24, 32, 40, 64], [0.5, 0.75, 0.4, 0.0, 1.0], [(56, 0.84)]),
    (144, 48, [16, 30, 36, 72, 100], [0.5, 0.75, 0.25], []),
    (256, 32, [26, 32, 64, 128], [0.5, 0.75, 0.4], []),
]
SEEDS = [0, 1, 2]
TOWER_BUDGETS = [(16, 0.5), (24, 0.5), (32, 0.75), (40, 0.5), (20, 0.4)]


def official(snapshot: Path) -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    ns: dict = {"torch": torch, "nn": nn, "ABC": ABC, "abstractmethod": abstractmethod}
    load_definitions(read_snapshot(snapshot, "llava/model/llava_arch.py"), {"LlavaMetaForCausalLM"}, ns)
    ns.update(CLIPVisionModel=CLIPVisionModel, CLIPVisionConfig=CLIPVisionConfig, CLIPImageProcessor=CLIPImageProcessor)
    load_definitions(read_snapshot(snapshot, "llava/model/multimodal_encoder/clip_encoder.py"), {"CLIPVisionTower"}, ns)
    return ns


def official_model(ns: dict, tower, visual_token_num: int, important_ratio: float):
    """An object of the official LlavaMetaForCausalLM with the few accessors its model class supplies."""
    return official_llava_model(ns["LlavaMetaForCausalLM"], tower, visual_token_num=visual_token_num,
                                important_ratio=important_ratio)


class TensorTower:
    """Stands in for the official CLIPVisionTower: returns fixed (B, N, C) features and (B, H, N) CLS rows."""

    def __init__(self, features: torch.Tensor, attentions: torch.Tensor):
        self.features, self.attentions = features, attentions

    def __call__(self, images, output_attentions=False):
        assert output_attentions
        return self.features.clone(), self.attentions.clone()


def seeded_inputs(seed: int, n: int, d: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable features (clustered for odd seeds: near-duplicates to remove) and attention rows."""
    g = torch.Generator().manual_seed(1000 * seed + n)
    if seed % 2:
        centres = torch.randn(batch, n // 8, d, generator=g)
        member = torch.randint(0, n // 8, (batch, n), generator=g)
        features = centres.gather(1, member[..., None].expand(-1, -1, d)) + 0.3 * torch.randn(batch, n, d, generator=g)
    else:
        features = torch.randn(batch, n, d, generator=g)
    attentions = (2.0 * torch.randn(batch, HEADS, n, generator=g)).softmax(-1)
    return features.half().float(), attentions.half().float()


def run_official(ns: dict, tower, images, t: int, ratio: float):
    """The official keep mask (B, N) bool, or the exception the official code raised."""
    model = official_model(ns, tower, t, ratio)
    try:
        with torch.no_grad():
            _, masks = model.encode_images(images)
    except Exception as exc:  # noqa: BLE001 - recorded: where the official loop cannot run
        return exc
    return masks


def tensor_cases(ns: dict) -> tuple[list[dict], list[dict]]:
    cases, failures = [], []
    for n, d, budgets, ratios, extra in SHAPES:
        for seed in SEEDS:
            features, attentions = seeded_inputs(seed, n, d)
            settings, masks = [], []
            for t, ratio in [(t, r) for t in budgets for r in ratios] + extra:
                out = run_official(ns, TensorTower(features, attentions), None, t, ratio)
                counts = None if isinstance(out, Exception) else out.sum(1).tolist()
                if isinstance(out, Exception) or counts != [t] * len(counts):
                    failures.append({"n": n, "seed": seed, "t": t, "ratio": ratio,
                                     "error": repr(out)[:200] if isinstance(out, Exception) else f"kept {counts}"})
                    continue
                settings.append((t, ratio))
                masks.append(out)
            # one stacked mask tensor per input: (settings, B, N)
            cases.append({"n": n, "d": d, "seed": seed, "features": features.half(), "attentions": attentions.half(),
                          "settings": settings, "masks": torch.stack(masks)})
            print(f"N={n} D={d} seed {seed}: {len(settings)} official results")
    return cases, failures


def tower_case(ns: dict) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    shape = dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=HEADS)
    torch.manual_seed(0)
    config = CLIPVisionConfig(**shape, initializer_factor=4.0)  # a larger init: peaked CLS attention
    hf = CLIPVisionModel(config).eval()
    state = {k: v.half() for k, v in hf.state_dict().items()}
    hf.load_state_dict({k: v.float() for k, v in state.items()})
    hf.config._attn_implementation = "eager"  # output_attentions needs the attention maps
    tower = ns["CLIPVisionTower"].__new__(ns["CLIPVisionTower"])
    nn.Module.__init__(tower)
    tower.select_layer, tower.select_feature, tower.is_loaded, tower.vision_tower = -2, "patch", True, hf
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7)).half().float()
    with torch.no_grad():
        _, attentions = tower(pixels, output_attentions=True)
    ranked = attentions.mean(1).sort(dim=-1, descending=True).values
    print(f"tower: smallest gap between ranked CLS attentions {float((ranked[:, :-1] - ranked[:, 1:]).min()):.2e}")
    masks = []
    for t, ratio in TOWER_BUDGETS:
        out = run_official(ns, tower, pixels, t, ratio)
        if isinstance(out, Exception) or out.sum(1).tolist() != [t, t]:
            raise SystemExit(f"tower case T={t} ratio={ratio}: the official code gave {out!r}")
        masks.append(out)
    # the official rows are the official features (identity projector) under each mask: stored once
    model = official_model(ns, tower, 64, 1.0)
    with torch.no_grad():
        features, _ = model.encode_images(pixels)
    return {"config": shape, "state": state, "pixel_values": pixels.half(), "settings": TOWER_BUDGETS,
            "masks": torch.stack(masks), "features": features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "vispruner" / "cases.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ns = official(args.snapshot)
    cases, failures = tensor_cases(ns)
    for f in failures:
        print(f"official code fails: N={f['n']} seed {f['seed']} T={f['t']} ratio={f['ratio']}: {f['error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"heads": HEADS, "tensors": cases, "failures": failures, "tower": tower_case(ns)}, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
