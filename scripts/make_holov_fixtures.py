"""Parity fixtures: the official HoloV selection run on small seeded tensors.

    python scripts/make_holov_fixtures.py --snapshot PATH [--out tests/fixtures/holov/cases.pt]

PATH is a local snapshot of the official repository (https://github.com/obananas/HoloV, Apache-2.0): a
checkout, or a git directory without a work tree (read with ``git show HEAD:...``). Nothing is fetched.
The official code is loaded from it at run time (ast + exec), never copied into vtc:
  * ``HoloV`` of llava/model/utils.py (the LLaVA function: returns the kept rows, zero rows as padding);
  * ``HoloV`` of qwen-model-HoloV/utils.py (the same selection, also returning the kept positions, -1 for
    padding); the script checks that both give the same rows, and the rows are the features at the positions;
  * the crop-count rule, the last ``num_patches = ...`` assignment of
    ``Qwen2_5_VLForConditionalGeneration.forward`` in qwen-model-HoloV/modeling_qwen2_5_vl.py, evaluated
    as an expression of ``image_token_len`` and ``keep_num``.
  * for the ``tower`` case, ``CLIPVisionTower`` (llava/model/multimodal_encoder/clip_encoder.py: its ``forward``
    and ``feature_select`` read layer -2's hidden state and CLS attention row) and ``LlavaMetaForCausalLM``
    (llava/model/llava_arch.py: ``encode_images`` averages the heads and projects). Stand-ins, outside the
    official code: ``get_model()`` (the model class only stores the tower and projector) and ``mm_projector`` =
    identity (so the rows are the features vtc returns before its projector, and the similarities are taken on
    them: vtc's ``space='features'``). The seeded tiny CLIP tower (144 patches, 3 layers) runs with eager
    attention; stored: its config, weights (fp16 values), pixel values, and the official positions and rows.
Both functions run on the CPU in fp32 as written.

Inputs: (B, N, D) token vectors (fp16-representable; half of the seeds clustered, so crops differ in
diversity) and (B, N) attention (half of the seeds peaked, so that some crops get more tokens than they
hold: there the official code pads with zero rows). Stored per input: the official positions (B, K) for
each (K, crop count) setting (the rows are the inputs at those positions: checked here). tests/test_holov.py compares vtc.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_recoverable_fixtures import load_definitions, official_llava_model, read_snapshot  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (N, D, budgets K, explicit crop counts besides the official rule): K = 1-3 reach one-token crops,
# K = N every crop's cap; 7, 10 and 16 crops do not divide 64, 100, 144 tokens.
SHAPES = [
    (64, 32, [1, 2, 3, 5, 8, 16, 24, 32, 48, 64], [7, 16]),
    (100, 32, [7, 10, 33, 64], [10, 16]),
    (144, 32, [1, 9, 16, 36, 50, 72, 144], [16]),
    (256, 32, [8, 26, 32, 64, 100, 128], [16]),
]
SEEDS = [0, 1, 2, 3]
BATCH = 2


def official(snapshot: Path) -> dict:
    llava: dict = {"torch": torch}
    load_definitions(read_snapshot(snapshot, "llava/model/utils.py"), {"HoloV"}, llava)
    qwen: dict = {"torch": torch}
    load_definitions(read_snapshot(snapshot, "qwen-model-HoloV/utils.py"), {"HoloV"}, qwen)
    return {"llava": llava["HoloV"], "qwen": qwen["HoloV"], "crops": crop_rule(snapshot)}


def official_tower(snapshot: Path, hf_tower):
    """The official CLIPVisionTower around ``hf_tower`` and an official LlavaMetaForCausalLM reading it."""
    from abc import ABC, abstractmethod

    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    ns: dict = {"torch": torch, "nn": nn, "ABC": ABC, "abstractmethod": abstractmethod, "CLIPVisionModel": CLIPVisionModel,
                "CLIPVisionConfig": CLIPVisionConfig, "CLIPImageProcessor": CLIPImageProcessor}
    load_definitions(read_snapshot(snapshot, "llava/model/multimodal_encoder/clip_encoder.py"), {"CLIPVisionTower"}, ns)
    load_definitions(read_snapshot(snapshot, "llava/model/llava_arch.py"), {"LlavaMetaForCausalLM"}, ns)
    tower = ns["CLIPVisionTower"].__new__(ns["CLIPVisionTower"])
    nn.Module.__init__(tower)
    tower.select_layer, tower.select_feature, tower.is_loaded, tower.vision_tower = -2, "patch", True, hf_tower

    return official_llava_model(ns["LlavaMetaForCausalLM"], tower)


TOWER = dict(image_size=36, patch_size=3, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TOWER_BUDGETS = [4, 9, 16, 36, 64]


def tower_case(snapshot: Path, fns: dict) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**TOWER, initializer_factor=4.0)).eval()  # a larger init: peaked attention
    state = {k: v.half() for k, v in hf.state_dict().items()}
    hf.load_state_dict({k: v.float() for k, v in state.items()})
    hf.config._attn_implementation = "eager"  # output_attentions needs the attention maps
    model = official_tower(snapshot, hf)
    pixels = torch.randn(BATCH, 3, 36, 36, generator=torch.Generator().manual_seed(7)).half().float()
    with torch.no_grad():
        features, attention = model.encode_images(pixels)
    n = features.shape[1]
    settings, positions, rows = [], [], []
    for k in TOWER_BUDGETS:
        crops = fns["crops"](n, k)
        pos, out = run_official(fns, features, attention, k, crops)
        settings.append((k, crops, True))
        positions.append(pos.short())
        rows.append(out)  # fp32: tower outputs are not fp16 values
    print(f"tower: N={n}, {sum(int((p < 0).any(1).sum()) for p in positions)} padded outputs")
    return {"config": TOWER, "state": state, "pixel_values": pixels.half(), "settings": settings,
            "positions": positions, "rows": rows}


def crop_rule(snapshot: Path):
    """The official ``num_patches`` expression of the Qwen forward, as a function of (N, K)."""
    tree = ast.parse(read_snapshot(snapshot, "qwen-model-HoloV/modeling_qwen2_5_vl.py"))
    found = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "num_patches" for t in node.targets)]
    if not found:
        raise SystemExit("snapshot lacks the num_patches rule: is it the official repository?")
    code = compile(ast.Expression(found[-1]), "<official num_patches>", "eval")  # the last one is in effect
    print("official crop rule:", ast.unparse(found[-1]))
    return lambda n, k: eval(code, {"max": max, "int": int}, {"image_token_len": n, "keep_num": k})  # noqa: S307


def seeded_inputs(seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * seed + n)
    if seed % 2:
        centres = torch.randn(BATCH, 6, d, generator=g)
        member = torch.randint(0, 6, (BATCH, n), generator=g)
        vectors = centres.gather(1, member[..., None].expand(-1, -1, d)) + 0.4 * torch.randn(BATCH, n, d, generator=g)
    else:
        vectors = torch.randn(BATCH, n, d, generator=g)
    sharpness = 4.0 if seed >= 2 else 1.0  # peaked attention: crops that earn more tokens than they hold
    attention = (sharpness * torch.randn(BATCH, n, generator=g)).softmax(-1)
    return vectors.half().float(), attention


def run_official(fns: dict, vectors: torch.Tensor, attention: torch.Tensor, k: int, crops: int):
    rows = fns["llava"](vectors, attention, crops, k)
    positions = []
    for b in range(vectors.shape[0]):
        qwen_rows, pos = fns["qwen"](vectors[b : b + 1], attention[b], crops, k)
        assert torch.equal(qwen_rows[0], rows[b]), "the two official files disagree"
        real = pos >= 0
        assert torch.equal(rows[b][real], vectors[b][pos[real]]) and not rows[b][~real].any()
        positions.append(pos)
    return torch.stack(positions), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "holov" / "cases.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fns = official(args.snapshot)
    cases, padded = [], 0
    for n, d, budgets, extra_crops in SHAPES:
        for seed in SEEDS if n < 256 else SEEDS[:2] + SEEDS[3:]:  # three inputs of 256 tokens: the file under 500 KB
            vectors, attention = seeded_inputs(seed, n, d)
            settings, positions = [], []
            for k in budgets:
                for crops in [fns["crops"](n, k)] + [c for c in extra_crops if c != fns["crops"](n, k)]:
                    pos, out = run_official(fns, vectors, attention, k, crops)
                    settings.append((k, crops, crops == fns["crops"](n, k)))
                    positions.append(pos.short())
                    padded += int((pos < 0).any(dim=1).sum())
            cases.append({"n": n, "d": d, "seed": seed, "vectors": vectors.half(), "attention": attention,
                          "settings": settings, "positions": positions})
            print(f"N={n} D={d} seed {seed}: {len(settings)} official results")
    print(f"{padded} official outputs padded with zero rows (a quota above its crop, or all weights 0)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"batch": BATCH, "cases": cases, "tower": tower_case(args.snapshot, fns)}, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
