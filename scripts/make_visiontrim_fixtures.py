"""Parity fixtures: VisionTrim's official DVTS + TGVC run on small seeded tensors.

    python scripts/make_visiontrim_fixtures.py --snapshot PATH [--commit SHA] [--out tests/fixtures/visiontrim/cases.pt]

PATH is a local snapshot of the official repository (https://github.com/hanxunyu/VisionTrim): a git
directory without a work tree, read with ``git show COMMIT:path``. Nothing is fetched. The code was deleted
from the repository's default branch (commit 5e299c0), so it is read at the last commit that holds it
(``--commit``, default 0ced4cb). The official definitions are loaded from it at run time (ast + exec), never
copied into vtc: ``CLIPVisionTower.token_prune_visiontrim`` and the ``build_token_affinity`` and
``combine_importance`` it calls (llava/model/multimodal_encoder/clip_encoder.py).

The method runs on a harness object of that class whose vision tower returns the case's hidden states and
attention maps, whose CLIP model is a seeded ``visual_projection`` / ``text_projection`` pair with a logit
scale, and whose text encoder returns the case's per-token text states (the tokenizer is a stand-in that
only reports the batch). Stored per case: the dominant indices, the complement targets' positions, the
complement rows, and the sum of the dominant rows (each dominant row is a patch's feature, so its kept index
says it; the sum guards the gather). Emulated, and nothing else: ``Tensor.cuda`` is the identity on this CPU machine
(``build_token_affinity`` moves its buffers to CUDA), and ``torch.sort`` records its input (the official
function returns only the features: the two sorts are the dominant indices and the complement targets'
positions among the other patches).

tests/test_visiontrim.py compares vtc's ``visiontrim`` with the cases.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_recoverable_fixtures import load_definitions  # noqa: E402  (one definition loader for every script)

ROOT = Path(__file__).resolve().parents[1]
CODE_COMMIT = "0ced4cb"  # the last commit holding llava/ (5e299c0 deleted it)
ENCODER = "llava/model/multimodal_encoder/clip_encoder.py"
# (N patches, seeds); every case: C vision width, P projection width, text width, heads, attention layers
SHAPES = [(64, [0, 1, 2]), (144, [3]), (256, [4])]
C, P, TEXT_WIDTH, HEADS, LAYERS, BATCH = 32, 16, 24, 4, 3, 2


def read_at(snapshot: Path, commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(snapshot), "show", f"{commit}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def full_commit(snapshot: Path, commit: str) -> str:
    return subprocess.run(["git", "--git-dir", str(snapshot), "rev-parse", commit], capture_output=True, text=True).stdout.strip()


class OfficialTorch(types.ModuleType):
    """``torch`` as the official code sees it, with ``sort`` recording its input."""

    def __init__(self):
        super().__init__("torch")
        self.sorted: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def sort(self, x, *args, **kwargs):
        self.sorted.append(x.clone())
        return torch.sort(x, *args, **kwargs)


@contextlib.contextmanager
def cuda_is_identity():
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def official(snapshot: Path, commit: str) -> tuple[type, OfficialTorch]:
    fake_torch = OfficialTorch()
    ns = {"torch": fake_torch, "nn": nn, "F": F, "math": math, "np": np}
    load_definitions(read_at(snapshot, commit, ENCODER), {"build_token_affinity", "combine_importance", "CLIPVisionTower"}, ns)
    return ns["CLIPVisionTower"], fake_torch


def harness(tower_class: type, hidden: torch.Tensor, attentions: tuple, text_states: torch.Tensor, clip: nn.Module):
    """A CLIPVisionTower whose towers return the case's tensors (``__init__`` skipped: it loads checkpoints)."""
    tower = tower_class.__new__(tower_class)
    nn.Module.__init__(tower)
    tower.is_loaded, tower.select_layer, tower.select_feature = True, -2, "patch"
    outs = types.SimpleNamespace(hidden_states=(hidden, hidden), attentions=attentions)
    vision = lambda images, **kwargs: outs  # noqa: E731
    tower.vision_tower = _Callable(vision, dtype=torch.float32, device=torch.device("cpu"))
    tower.text_tokenizer = _Callable(lambda *a, **k: _Batch())
    tower.text_encoder = _Callable(lambda **k: types.SimpleNamespace(last_hidden_state=text_states))
    tower.clip_model = clip
    return tower


class _Callable:
    def __init__(self, fn, **attrs):
        self.fn = fn
        self.__dict__.update(attrs)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class _Batch(dict):
    def to(self, device):
        return self


def random_attention(g: torch.Generator, n: int) -> torch.Tensor:
    """(B, heads, 1+N, 1+N) softmax rows with varied sharpness, like a ViT's."""
    logits = torch.randn(BATCH, HEADS, 1 + n, 1 + n, generator=g) * 3
    return logits.softmax(-1)


def attention_signals(attention: torch.Tensor) -> dict:
    """What vtc's adapter reads from the official DVTS layer's attention (B, heads, 1+N, 1+N), head-averaged:
    the CLS row, and the attention each patch receives from the other patches (diagonal out, over N - 1).
    The maps themselves are not stored (megabytes); tests/test_visiontrim.py checks vtc's adapter computes
    the same two signals from a tower's q/k as eager attention does."""
    mean = attention.mean(1)
    patches = mean[:, 1:, 1:]
    n = patches.shape[-1]
    others = (patches.sum(1) - patches.diagonal(dim1=1, dim2=2)) / (n - 1)
    return {"cls_attn": mean[:, 0, 1:].clone(), "received_others": others}


def budgets(n: int) -> list[tuple[int, int]]:
    """(dominant, complement) counts: the official defaults' 48 + 16 shape scaled, and small and large ends."""
    return sorted({(1, 1), (3, 1), (6, 2), (n // 8, n // 16), (n // 4, n // 8), (n // 2, n // 8), (n - 8, 4), (n - 2, 2)})


def cases(tower_class: type, fake_torch: OfficialTorch) -> tuple[list[dict], list[dict]]:
    inputs, out = [], []
    for n, seeds in SHAPES:
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            hidden = torch.randn(BATCH, 1 + n, C, generator=g)
            attentions = tuple(random_attention(g, n) for _ in range(LAYERS))
            tokens = 5 + 4 * (seed % 2)  # question lengths 5 and 9, BOS and EOS included
            text_states = torch.randn(BATCH, tokens, TEXT_WIDTH, generator=g)
            torch.manual_seed(1000 + seed)
            clip = nn.Module()
            clip.visual_projection = nn.Linear(C, P, bias=False)
            clip.text_projection = nn.Linear(TEXT_WIDTH, P, bias=False)
            clip.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
            inputs.append({"hidden": hidden, **attention_signals(attentions[-2]), "text_states": text_states,
                           "visual_projection": clip.visual_projection.weight.detach().clone(),
                           "text_projection": clip.text_projection.weight.detach().clone(), "label": f"seed {seed}, N={n}"})
            tower = harness(tower_class, hidden, attentions, text_states, clip)
            for dominant, complement in budgets(n):
                fake_torch.sorted.clear()
                with torch.no_grad(), cuda_is_identity():
                    _, rows = tower.token_prune_visiontrim(
                        torch.zeros(BATCH, 3, 2, 2), DVTS_token_num=dominant, TGVC_token_num=complement,
                        original_qs=["q"] * BATCH,
                    )
                kept, target_positions = fake_torch.sorted[0], fake_torch.sorted[1]
                out.append({"input": len(inputs) - 1, "dominant": dominant, "complement": complement, "kept": kept,
                            "target_positions": target_positions, "complement_rows": rows[:, dominant:].clone(),
                            "dominant_rows_sum": rows[:, :dominant].sum(1)})
    return inputs, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--commit", default=CODE_COMMIT)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "visiontrim" / "cases.pt")
    args = parser.parse_args()
    tower_class, fake_torch = official(args.snapshot, args.commit)
    inputs, found = cases(tower_class, fake_torch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"commit": full_commit(args.snapshot, args.commit), "inputs": inputs, "cases": found}, args.out)
    print(f"{len(found)} cases on {len(inputs)} inputs -> {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
