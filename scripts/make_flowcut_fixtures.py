"""Parity fixtures: FlowCut's official scoring, pruning step and tower loop run on seeded tensors and a tiny CLIP.

    python scripts/make_flowcut_fixtures.py --snapshot PATH [--out tests/fixtures/flowcut/cases.pt]

PATH is a local snapshot of the official repository (https://github.com/TungChintao/FlowCut): a checkout, or
a git directory without a work tree (read with ``git show HEAD:...``). Nothing is fetched. The official
functions are loaded from it at run time (ast + exec), never copied into vtc:

* ``compute_score`` and ``adaptive_prune_ratio`` (flowcut/utils_flowcut.py), on seeded attention rows, value
  vectors and schedules (``scores`` and ``counts`` cases; batches of one, and of three for the batch maximum).
* ``CLIPEncoder_forward`` driving ``CLIPEncoderLayer_forward`` (flowcut/modeling_clip_flowcut.py) over layers
  whose attention outputs are seeded tensors: the layer's norms and MLP are identities/zero and its attention
  returns the case's CLS row, semantic row and value metric, so the official per-layer selection runs on
  them as it stands, across the official layer schedule (``steps`` cases).
* The whole official tower, ``CLIPVisionTransformer_forward`` -> ``CLIPEncoder_forward`` ->
  ``CLIPEncoderLayer_forward`` -> ``CLIPAttention_forward``, configured by ``apply_flowcut_config``, on a
  tiny random CLIP vision tower (8 layers, 64 patches; seeded, its q/k projections sharpened so the CLS
  attention is far from flat and the adaptive count matters): LLaVA's feature layer (hidden_states[-2], CLS
  dropped, as LLaVA's ``feature_select`` reads it), the kept patch indices, and every layer's attention
  signals, cumulative score and kept indices (``tower`` cases).

Emulated, and nothing else: the transformers<=4.47 ``CLIPAttention._shape`` helper (a view to
(B, heads, T, head_dim), gone from the installed transformers 5) is attached to each attention module;
transformers' docstring decorators on ``CLIPVisionTransformer_forward`` (they edit ``__doc__`` and read the
function's source file, which code exec'd from a snapshot lacks) are identities; transformers 5's
``CLIPVisionModel`` is itself the vision transformer, so ``apply_flowcut_config`` gets it as ``.vision_model``
of a namespace (transformers 4's layout); the target is set as ``flowcut()`` in flowcut/main.py sets it for LLaVA's 'patch' features (K + 1: CLS + K patches),
since ``flowcut()`` itself imports the LLaVA package. No CUDA call is made by these functions.

tests/test_flowcut.py compares vtc's ``flowcut`` with the cases.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_recoverable_fixtures import load_definitions, read_snapshot  # noqa: E402  (one snapshot reader for every script)

ROOT = Path(__file__).resolve().parents[1]
TOWER = {"image_size": 64, "patch_size": 8, "hidden": 32, "layers": 8, "heads": 4, "seed": 11, "sharpen": 6.0}


def snapshot_commit(snapshot: Path) -> str:
    git_dir = snapshot / ".git" if (snapshot / ".git").exists() else snapshot
    return subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def official(snapshot: Path) -> dict:
    from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
    from transformers.models.clip.configuration_clip import CLIPVisionConfig

    def docstring_only(*args, **kwargs):  # the docstring decorators read the source file, which exec'd code lacks
        return lambda fn: fn

    ns: dict = {"torch": torch}
    load_definitions(read_snapshot(snapshot, "flowcut/utils_flowcut.py"),
                     {"compute_score", "adaptive_prune_ratio", "CLIP_VISION_INPUTS_DOCSTRING"}, ns)
    ns.update(nn=nn, F=F, Optional=Optional, Tuple=Tuple, Union=Union, List=List, Any=Any,
              BaseModelOutput=BaseModelOutput, BaseModelOutputWithPooling=BaseModelOutputWithPooling,
              CLIPVisionConfig=CLIPVisionConfig, add_start_docstrings_to_model_forward=docstring_only,
              replace_return_docstrings=docstring_only)
    load_definitions(read_snapshot(snapshot, "flowcut/modeling_clip_flowcut.py"),
                     {"CLIPAttention_forward", "CLIPEncoderLayer_forward", "CLIPEncoder_forward",
                      "CLIPVisionTransformer_forward", "apply_flowcut_config"}, ns)
    return ns


def softmax_rows(g: torch.Generator, b: int, t: int, sharpness: float) -> torch.Tensor:
    return (torch.randn(b, t, generator=g) * sharpness).softmax(-1)


# ----------------------------------------------------------------------------- compute_score, adaptive_prune_ratio


def score_cases(ns: dict) -> tuple[list[dict], list[dict]]:
    scores, counts = [], []
    for seed, (n, sharpness) in enumerate([(64, 1.0), (64, 4.0), (144, 2.0), (256, 3.0), (256, 0.2)]):
        g = torch.Generator().manual_seed(seed)
        cls_row = softmax_rows(g, 1, 1 + n, sharpness)  # softmax over CLS + patches, as the layer gives it
        semantic = softmax_rows(g, 1, 1 + n, sharpness)
        values = torch.randn(1, n, 8, generator=g)
        score = ns["compute_score"](cls_row[:, 1:], semantic[:, 1:], values)
        scores.append({"cls_attn": cls_row[:, 1:], "semantic": semantic[:, 1:], "values": values, "score": score})
        for remaining, target in [(2, 8), (4, 1), (20, n // 9), (6, n // 2)]:
            counts.append({"cls_attn": cls_row[:, 1:], "remaining": remaining, "target": target,
                           "count": ns["adaptive_prune_ratio"](cls_row[:, 1:], remaining, target)})
    g = torch.Generator().manual_seed(99)  # a batch of three: the official count is the batch's largest
    rows = torch.stack([softmax_rows(g, 1, 65, s)[0] for s in (0.3, 2.0, 5.0)])[:, 1:]
    counts.append({"cls_attn": rows, "remaining": 4, "target": 8, "count": ns["adaptive_prune_ratio"](rows, 4, 8)})
    return scores, counts


# ----------------------------------------------------------------------------- the per-layer selection


class SignalLayer:
    """An encoder layer whose norms are identities, MLP zero, and attention the case's seeded signals: the
    official ``CLIPEncoderLayer_forward`` bound to it runs only its FlowCut selection on the hidden states."""

    def __init__(self, ns: dict, g: torch.Generator, sharpness: float, head_dim: int, record: list):
        self.forward = types.MethodType(ns["CLIPEncoderLayer_forward"], self)
        self.g, self.sharpness, self.head_dim, self.record = g, sharpness, head_dim, record
        self.layer_norm1 = self.layer_norm2 = lambda x: x
        self.mlp = torch.zeros_like

    def self_attn(self, hidden_states, attention_mask, causal_attention_mask, output_attentions):
        b, t, _ = hidden_states.shape
        cls_row = softmax_rows(self.g, b, t, self.sharpness)
        semantic = softmax_rows(self.g, b, t, self.sharpness)
        value = torch.randn(b, t, self.head_dim, generator=self.g) * (1 + torch.rand(b, t, 1, generator=self.g))
        self.record.append({"tokens": t, "cls_attn": cls_row[:, 1:], "semantic": semantic[:, 1:], "value": value[:, 1:]})
        return torch.zeros_like(hidden_states), cls_row[:, None, None, :], semantic, value

    def __call__(self, *args, **kwargs):
        outputs, cumulative, kept = self.forward(*args, **kwargs)
        self.record[-1].update(cumulative=None if cumulative is None else cumulative.clone(), kept=kept.clone())
        return outputs, cumulative, kept


def step_cases(ns: dict) -> list[dict]:
    cases = []
    for seed, (n, layers, feature_layers, k, sharpness) in enumerate(
        [(64, 8, 7, 8, 3.0), (64, 8, 7, 1, 5.0), (64, 6, 5, 40, 1.0), (144, 12, 11, 16, 4.0), (64, 24, 23, 6, 2.0),
         (196, 10, 9, 49, 6.0), (36, 4, 3, 36, 3.0), (36, 3, 2, 5, 3.0)]
    ):
        g = torch.Generator().manual_seed(1000 + seed)
        record: list = []
        encoder = types.SimpleNamespace(
            config=types.SimpleNamespace(output_attentions=False, output_hidden_states=True, use_return_dict=True),
            gradient_checkpointing=False, training=False,
            layers=[SignalLayer(ns, g, sharpness, 4, record) for _ in range(layers)],
            target=k + 1, select_layer=feature_layers - 1,  # the official select_layer for LLaVA's -2 is F - 1
        )
        hidden = torch.randn(1, 1 + n, 12, generator=g)
        out, kept = ns["CLIPEncoder_forward"](encoder, hidden, return_dict=True)
        features = out.hidden_states[feature_layers][:, 1:]  # LLaVA's feature layer, CLS dropped
        cases.append({"hidden": hidden, "k": k, "feature_layers": feature_layers, "layers": record,
                      "kept": kept, "features": features})
    return cases


# ----------------------------------------------------------------------------- the whole official tower


def tiny_tower() -> nn.Module:
    """The seeded tiny CLIP vision tower; its q/k projections are scaled so the CLS attention is peaked.
    tests/test_flowcut.py builds the same one (and checks the fingerprint stored with the cases)."""
    from vtc.testing import sharpened_clip_tower

    return sharpened_clip_tower(**TOWER)


def tower_pixels(seed: int) -> torch.Tensor:
    """The seeded input image (regenerated by the test; its sum is stored to check)."""
    size = TOWER["image_size"]
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def legacy_shape(self, tensor: torch.Tensor, seq_len: int, bsz: int) -> torch.Tensor:
    """transformers<=4.47's ``CLIPAttention._shape``, which the official attention forward calls."""
    return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()


def patch_official(ns: dict, tower: nn.Module, record: list) -> None:
    """Bind the official forwards to this tower's modules (instances only), recording each layer."""
    vision = tower  # transformers 5's CLIPVisionModel is itself the vision transformer (no .vision_model)
    vision.forward = types.MethodType(ns["CLIPVisionTransformer_forward"], vision)
    vision.encoder.forward = types.MethodType(ns["CLIPEncoder_forward"], vision.encoder)
    for layer in vision.encoder.layers:
        attn = layer.self_attn
        attn._shape = types.MethodType(legacy_shape, attn)
        official_attn = types.MethodType(ns["CLIPAttention_forward"], attn)

        def attention(*args, _official=official_attn, **kwargs):
            out = _official(*args, **kwargs)
            record.append({"tokens": out[2].shape[1], "cls_attn": out[1][:, :, 0, 1:].mean(1), "semantic": out[2][:, 1:],
                           "value": out[3][:, 1:]})
            return out

        attn.forward = attention
        official_layer = types.MethodType(ns["CLIPEncoderLayer_forward"], layer)

        def encoder_layer(*args, _official=official_layer, **kwargs):
            outputs, cumulative, kept = _official(*args, **kwargs)
            record[-1].update(cumulative=None if cumulative is None else cumulative.clone(), kept=kept.clone())
            return outputs, cumulative, kept

        layer.forward = encoder_layer


def tower_cases(ns: dict) -> tuple[list[dict], float]:
    tower = tiny_tower()
    fingerprint = float(sum(p.detach().double().sum() for p in tower.parameters()))
    record: list = []
    patch_official(ns, tower, record)
    n = (TOWER["image_size"] // TOWER["patch_size"]) ** 2
    cases = []
    for seed in (0, 1, 2):
        pixels = tower_pixels(seed)
        for k in (1, 6, 16, 40, n):
            ns["apply_flowcut_config"](types.SimpleNamespace(vision_model=tower), target_tokens=k + 1)  # flowcut(): target_num + 1 for 'patch'
            record.clear()
            with torch.no_grad():
                out, kept = tower(pixels, output_hidden_states=True, output_attentions=True)
            if seed or k not in (6, 16):  # the layers' signals of two cases only: they are most of the file's size
                record[:] = [{key: r[key] for key in ("tokens", "kept")} for r in record]
            cases.append({"seed": seed, "pixel_sum": float(pixels.sum()), "k": k, "features": out.hidden_states[-2][:, 1:].clone(), "kept": kept,
                          "layers": [dict(r) for r in record]})
    return cases, fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "flowcut" / "cases.pt")
    args = parser.parse_args()
    ns = official(args.snapshot)
    scores, counts = score_cases(ns)
    steps = step_cases(ns)
    tower, fingerprint = tower_cases(ns)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"commit": snapshot_commit(args.snapshot), "scores": scores, "counts": counts, "steps": steps,
                "tower": tower, "tower_config": TOWER, "fingerprint": fingerprint}, args.out)
    print(f"{len(scores)} score, {len(counts)} count, {len(steps)} step and {len(tower)} tower cases -> {args.out} "
          f"({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
