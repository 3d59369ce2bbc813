"""Parity fixtures: CDPruner's official selection run on small seeded tensors and on a tiny CLIP.

    python scripts/make_cdpruner_fixtures.py --snapshot PATH [--out tests/fixtures/cdpruner/cases.pt]

PATH is a local snapshot of the official repository (https://github.com/Theia-4869/CDPruner): a checkout,
or a git directory without a work tree (read with ``git show HEAD:...``). Nothing is fetched. The official
functions are loaded from it at run time (ast + exec), never copied into vtc:

* ``LlavaMetaForCausalLM.encode_images`` (llava/model/llava_arch.py): relevance, kernel, greedy MAP, mask.
  It runs inside a harness whose vision tower returns the case's tensors and whose projector is a seeded
  LLaVA-style MLP.
* ``CLIPVisionTower.forward`` (llava/model/multimodal_encoder/clip_encoder.py): which patch states and which
  text embeddings the relevance reads, on vtc's tiny random CLIP (``vtc.testing.save_tiny_clip``, seed 1: the
  checkpoint tests/conftest.py builds), for a short question and one longer than the text tower's context.

Emulated, and nothing else: ``torch.cuda.Stream``/``torch.cuda.stream``/``torch.cuda.synchronize`` (the
forward overlaps the two towers on CUDA streams) are no-ops on this CPU machine, and ``torch.sort`` records
its input, which is the greedy picks in pick order (the official function returns only the final mask).
The tiny word tokenizer reports CLIP's model inputs (ids and mask), as CLIPTokenizerFast does.

tests/test_cdpruner.py compares vtc's ``cdpruner`` with the cases.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import types
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_recoverable_fixtures import load_definitions, read_snapshot  # noqa: E402  (one snapshot reader for every script)

ROOT = Path(__file__).resolve().parents[1]
# (N patches, C vision width, P CLIP projection width, D projected width, seeds)
SHAPES = [(64, 32, 16, 48, [0, 1, 2]), (144, 32, 16, 48, [3, 4]), (256, 32, 16, 48, [5, 6])]
DUPLICATES = [(5, 40), (12, 13), (0, 63)]  # (token, its copy) in the tie case, the first pair the most relevant
ROWS_UP_TO = 16  # budgets whose kept rows are stored
QUESTIONS = [
    "what is the color of the small circle ?",
    # 37 tokens + EOS: two segments of the tiny text tower's 32 positions
    "how many red circle and blue square and green triangle are there in the image , what is left of the large "
    "yellow object and what is right of the small one , describe the picture ?",
]


def snapshot_commit(snapshot: Path) -> str:
    git_dir = snapshot / ".git" if (snapshot / ".git").exists() else snapshot
    return subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


class OfficialTorch(types.ModuleType):
    """``torch`` as the official code sees it: CUDA stream calls are no-ops; ``sort`` records its input and
    ``sqrt`` its argument (in the greedy loop: the gain of each step's pick)."""

    def __init__(self):
        super().__init__("torch")
        self.sorted: list[torch.Tensor] = []
        self.roots: list[torch.Tensor] = []
        self.cuda = types.SimpleNamespace(
            Stream=lambda *a, **k: None, stream=lambda s: contextlib.nullcontext(), synchronize=lambda: None
        )

    def __getattr__(self, name):
        return getattr(torch, name)

    def sort(self, x, *args, **kwargs):
        self.sorted.append(x.clone())
        return torch.sort(x, *args, **kwargs)

    def sqrt(self, x, *args, **kwargs):
        self.roots.append(x.clone())
        return torch.sqrt(x, *args, **kwargs)


def official(snapshot: Path) -> tuple[type, type, OfficialTorch]:
    fake_torch = OfficialTorch()
    arch = {"torch": fake_torch, "nn": nn, "ABC": ABC, "abstractmethod": abstractmethod}
    load_definitions(read_snapshot(snapshot, "llava/model/llava_arch.py"), {"LlavaMetaForCausalLM"}, arch)
    encoder = {"torch": fake_torch, "nn": nn}
    load_definitions(read_snapshot(snapshot, "llava/model/multimodal_encoder/clip_encoder.py"), {"CLIPVisionTower"}, encoder)
    return arch["LlavaMetaForCausalLM"], encoder["CLIPVisionTower"], fake_torch


def projector(c: int, d: int, seed: int) -> nn.Module:
    """LLaVA-1.5's mlp2x_gelu projector, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d)).eval()


def run_official(meta: type, fake_torch: OfficialTorch, tower, project: nn.Module, k: int, texts="q") -> dict:
    """The official ``encode_images`` with ``tower`` as the vision tower: pick order, each pick's gain (a gain
    that is not positive makes the official step NaN), kept mask, kept rows."""
    model = types.SimpleNamespace(get_vision_tower=lambda: tower, mm_projector=project)

    class Harness(meta):
        visual_token_num = k

        def get_model(self):
            return model

    fake_torch.sorted.clear()
    fake_torch.roots.clear()
    with torch.no_grad():
        projected, mask = Harness().encode_images(torch.zeros(1), texts=texts)
    order = fake_torch.sorted[-1]  # (B, T) picks in pick order
    gains = torch.stack(fake_torch.roots[-k:])[:, 0]  # the greedy loop's k square roots, after any others
    return {"order": order[0], "gains": gains, "kept": mask[0].nonzero().squeeze(1), "rows": projected[mask]}


def tensor_cases(meta, fake_torch) -> tuple[list[dict], dict, list[dict]]:
    """Random tensors straight into ``encode_images``: every shape and seed, several budgets."""
    inputs, projectors, cases = [], {}, []

    def add(features, image_embeds, text_embeds, name, project, budgets, label):
        projectors[name] = {k: v.clone() for k, v in project.state_dict().items()}
        inputs.append({"features": features[0], "image_embeds": image_embeds[0], "text_embeds": text_embeds,
                       "projector": name, "label": label})
        for k in budgets:
            tower = lambda images, texts=None: (features, image_embeds, text_embeds)  # noqa: E731
            out = run_official(meta, fake_torch, tower, project, k)
            if k > ROWS_UP_TO:  # keeps the file small: the kept rows of the larger budgets are not stored
                del out["rows"]
            cases.append({"input": len(inputs) - 1, "k": k, **out})

    for n, c, p, d, seeds in SHAPES:
        project = projector(c, d, seed=100 + n)
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            features = torch.randn(1, n, c, generator=g)
            image_embeds = torch.randn(1, n, p, generator=g)
            text_embeds = torch.randn(1 + seed % 2, p, generator=g)  # 1 or 2 text segments
            add(features, image_embeds, text_embeds, f"N={n}", project, sorted({1, 2, 9, n // 8, n // 4, n // 2}),
                f"seed {seed}, N={n}")
    # Ties: duplicated tokens (equal kernel rows and gains). Exhausted: the projected width (8) is below the budget.
    g = torch.Generator().manual_seed(7)
    features, image_embeds = torch.randn(1, 64, 32, generator=g), torch.randn(1, 64, 16, generator=g)
    text_embeds = torch.randn(1, 16, generator=g)
    for rank, (a, b) in enumerate(DUPLICATES):  # each pair among the most relevant tokens (relevance is -cos)
        image_embeds[0, a] = -text_embeds[0] + 0.3 * rank * torch.randn(16, generator=g)
        features[0, b], image_embeds[0, b] = features[0, a], image_embeds[0, a]
    add(features, image_embeds, text_embeds, "duplicates", projector(32, 48, seed=200), (2, 8, 32), "duplicated tokens")
    add(features, image_embeds, text_embeds, "width 8", projector(32, 8, seed=201), (6, 12), "projected width 8")
    return inputs, projectors, cases


def clip_cases(meta, tower_class, fake_torch, workdir: Path) -> list[dict]:
    """The official CLIP tower forward (feature-layer states, segmented question) feeding ``encode_images``."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from vtc.testing import save_tiny_clip

    clip_dir = save_tiny_clip(workdir / "clip")
    tower = tower_class.__new__(tower_class)
    nn.Module.__init__(tower)
    tower.is_loaded, tower.select_layer, tower.select_feature = True, -2, "patch"
    tower.vision_tower = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    tower.text_tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    tower.text_tokenizer.model_input_names = ["input_ids", "attention_mask"]  # CLIPTokenizerFast's inputs
    tower.text_tower = CLIPTextModelWithProjection.from_pretrained(clip_dir).eval()
    tower.max_position_embeddings = tower.text_tower.config.max_position_embeddings
    width = tower.vision_tower.config.hidden_size
    fingerprint = float(tower.text_tower.text_projection.weight.sum() + tower.vision_tower.visual_projection.weight.sum())
    cases = []
    for seed, question in enumerate(QUESTIONS):
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            _, image_embeds, text_embeds = tower(pixels, texts=question)
        cosine = (nn.functional.normalize(image_embeds, dim=-1) @ nn.functional.normalize(text_embeds, dim=-1).T).mean(-1)
        project = projector(width, 24, seed=300 + seed)
        for k in (1, 4, 8):
            out = run_official(meta, fake_torch, lambda images, texts=None: tower(pixels, texts=texts), project, k, question)
            cases.append({"pixel_values": pixels, "question": question, "segments": text_embeds.shape[0],
                          "cosine": cosine[0], "projector": project.state_dict(), "k": k, **out})
    return [{"fingerprint": fingerprint, **c} for c in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "cdpruner" / "cases.pt")
    args = parser.parse_args()
    meta, tower_class, fake_torch = official(args.snapshot)
    inputs, projectors, cases = tensor_cases(meta, fake_torch)
    with tempfile.TemporaryDirectory() as tmp:
        clip = clip_cases(meta, tower_class, fake_torch, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"commit": snapshot_commit(args.snapshot), "inputs": inputs, "projectors": projectors, "cases": cases,
                "clip": clip}, args.out)
    print(f"{len(cases)} tensor cases on {len(inputs)} inputs, {len(clip)} CLIP cases -> {args.out} "
          f"({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
