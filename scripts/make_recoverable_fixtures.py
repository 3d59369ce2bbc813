"""Parity fixtures: the published Recoverable Compression code run on small seeded towers.

    python scripts/make_recoverable_fixtures.py --snapshot PATH [--out tests/fixtures/recoverable_original]

PATH is a local snapshot of the official repository (https://github.com/banjiuyufen/Recoverable-Compression):
a checkout, or a git directory without a work tree (read with ``git show HEAD:...``). Nothing is fetched.
The published functions are loaded from it at run time (ast + exec), never copied into vtc:
``CLIPTextEncoder.forward`` (text query -> CLIP text embedding), ``CLIPVisionTower.get_score_by_text``
and ``token_recycling_with_text_in_vision_and_clustring`` (selection + merge), LLaVA's
``tokenizer_image_token`` and the ``vicuna_v1`` conversation its evaluation scripts use.

The towers: a random CLIP with a 24-layer vision tower (the published code hooks encoder layer 23),
width 96 (the published centre count is int(width x r_c)), 224 px / patch 14 = 256 patches, weights drawn with a larger init so that CLS attention is
peaked, and a 2-layer text tower over the demo CLIP's tokenizer. The LLM tokenizer is the demo LLaVA's.
The output directory gets the CLIP checkpoint (with the demo CLIP tokenizer) and ``cases.pt``: the pixel
values per seed; per (seed, question) the published text query, text embedding, text score and output tokens;
and short text-only cases (the question without the system sentence: padded, unmasked text reading).
tests/test_recoverable_parity.py compares vtc's ``recoverable`` with ``compat="original"`` against them.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import LocalOutlierFactor
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "vtc" / "demo" / "checkpoint"
QUESTIONS = ["what is the color of the small circle ?", "is there a red square ?", "how many triangle ?"]
SEEDS = list(range(8))


def read_snapshot(snapshot: Path, path: str) -> str:
    if (snapshot / path).is_file():
        return (snapshot / path).read_text()
    return subprocess.run(
        ["git", "--git-dir", str(snapshot), "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def load_definitions(source: str, names: set[str], namespace: dict) -> dict:
    """Exec only the top-level functions, classes and assignments called ``names`` from ``source``."""
    tree = ast.parse(source)
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            keep.append(node)
    found = {n.name if not isinstance(n, ast.Assign) else n.targets[0].id for n in keep}
    if found != names:
        raise SystemExit(f"snapshot lacks {sorted(names - found)}: is it the official repository?")
    exec(compile(ast.Module(body=keep, type_ignores=[]), "<published>", "exec"), namespace)
    return namespace


def official_llava_model(arch_class: type, tower, **accessors):
    """An object of an official repository's ``LlavaMetaForCausalLM`` (``arch_class``) with what its model class
    supplies: ``get_model()`` whose ``get_vision_tower()`` is ``tower`` and whose projector is the identity, and one
    ``get_<name>()`` per keyword (e.g. ``visual_token_num=64`` gives ``get_visual_token_num() -> 64``)."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.mm_projector = nn.Identity()

        def get_vision_tower(self):
            return tower

    class Model(arch_class):
        def __init__(self):
            self.inner = Inner()

        def get_model(self):
            return self.inner

    for name, value in accessors.items():
        setattr(Model, f"get_{name}", lambda self, value=value: value)
    return Model()


def published(snapshot: Path) -> dict:
    from transformers import StoppingCriteria

    ns: dict = {"torch": torch, "nn": nn, "F": F, "np": np, "LocalOutlierFactor": LocalOutlierFactor}
    load_definitions(
        read_snapshot(snapshot, "llava/model/multimodal_encoder/clip_encoder.py"),
        {"complement_idx", "outputs", "hook_k", "hook_q", "find_max_derivative_position", "CLIPTextEncoder", "CLIPVisionTower"},
        ns,
    )
    exec(compile(read_snapshot(snapshot, "llava/constants.py"), "<constants>", "exec"), ns)
    ns["StoppingCriteria"] = StoppingCriteria
    load_definitions(read_snapshot(snapshot, "llava/mm_utils.py"), {"tokenizer_image_token"}, ns)
    conv: dict = {}
    exec(compile(read_snapshot(snapshot, "llava/conversation.py"), "<conversation>", "exec"), conv)
    ns["conv_templates"] = conv["conv_templates"]
    return ns


def build_clip(out: Path, clip_tokenizer) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        image_size=224, patch_size=14, hidden_size=96, intermediate_size=32, num_hidden_layers=24,
        num_attention_heads=2, projection_dim=16, initializer_factor=8.0,
    )
    text = CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=96, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=16, bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id,
    )
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    # Stored in fp16 to stay small; everything (published code and vtc) loads it back as fp32, exactly.
    model.half().save_pretrained(out)
    clip_tokenizer.save_pretrained(out)


def run_published(ns: dict, clip_dir: Path, llm_tokenizer, clip_tokenizer) -> list[dict]:
    from transformers import CLIPTextModelWithProjection, CLIPVisionModel, CLIPVisionModelWithProjection

    text_encoder = ns["CLIPTextEncoder"].__new__(ns["CLIPTextEncoder"])
    nn.Module.__init__(text_encoder)
    text_encoder.tokenzier_llama, text_encoder.text_processor = llm_tokenizer, clip_tokenizer
    text_encoder.text_encoder = CLIPTextModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    text_encoder.max_length = 20  # PretrainedConfig.max_length in the transformers the code pins

    tower = ns["CLIPVisionTower"].__new__(ns["CLIPVisionTower"])
    nn.Module.__init__(tower)
    tower.select_layer, tower.select_feature, tower.is_loaded = -2, "patch", True
    tower.vision_tower = CLIPVisionModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    tower.vision_tower_with_project = CLIPVisionModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    # transformers 5 flattened CLIPVisionModel (its layers are at .encoder, not .vision_model.encoder): give
    # the published hook code the old path, outside the module tree so nothing recurses into it.
    object.__setattr__(tower.vision_tower, "vision_model", tower.vision_tower)

    cases, pixels_by_seed = [], {}
    for seed in SEEDS:
        # fp16-representable values, stored as fp16 (exact), used as fp32
        pixels_by_seed[seed] = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed)).half().float()
        for question in QUESTIONS[seed % len(QUESTIONS) :][:1]:  # the query is the system line: one question per image
            conv = ns["conv_templates"]["vicuna_v1"].copy()
            conv.append_message(conv.roles[0], ns["DEFAULT_IMAGE_TOKEN"] + "\n" + question)
            conv.append_message(conv.roles[1], None)
            ids = ns["tokenizer_image_token"](conv.get_prompt(), llm_tokenizer, ns["IMAGE_TOKEN_INDEX"], return_tensors="pt")
            ids_noim = ids[ids != ns["IMAGE_TOKEN_INDEX"]]
            pixels = pixels_by_seed[seed]
            with torch.no_grad():
                text_features = text_encoder(ids_noim)
                similarity, _ = tower.get_score_by_text(pixels, text_features)
                similarity = similarity.clone()  # the selection below overwrites its argument in place
                tokens = tower(pixels, text_features)
            cases.append({
                "seed": seed, "question": question, "query": text_features[1],
                "text_embedding": text_features[0][0], "text_sim": similarity[0, 0], "tokens": tokens[0],
            })
            print(f"seed {seed} {question!r}: {tokens.shape[1]} tokens")
    # Short queries (no system sentence) exercise the padded, unmasked last-position reading of the text tower.
    text_cases = []
    for question in QUESTIONS:
        ids = ns["tokenizer_image_token"](ns["DEFAULT_IMAGE_TOKEN"] + "\n" + question, llm_tokenizer, ns["IMAGE_TOKEN_INDEX"])
        with torch.no_grad():
            embedding, query = text_encoder(torch.tensor([i for i in ids if i != ns["IMAGE_TOKEN_INDEX"]]))
        text_cases.append({"query": query, "text_embedding": embedding[0]})
    stored = {seed: p.half() for seed, p in pixels_by_seed.items()}
    return {"cases": cases, "pixel_values": stored, "text_cases": text_cases}


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True, help="official repository snapshot (checkout or git dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "recoverable_original")
    args = parser.parse_args()
    ns = published(args.snapshot)
    # The tokenizers are pinned in the fixture folder (the basic-family demo's, which made the fixtures): the
    # shipped demo checkpoint's grew with the clutter words ("of" among them), which changes the decoded query.
    llm_dir, clip_dir = args.out / "llm_tokenizer", args.out / "clip"
    if not llm_dir.is_dir():  # first run: pin the demo's LLM tokenizer beside the fixtures
        AutoTokenizer.from_pretrained(DEMO / "llava").save_pretrained(llm_dir)
    llm_tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    clip_tokenizer = AutoTokenizer.from_pretrained(clip_dir if (clip_dir / "tokenizer.json").is_file() else DEMO / "clip")
    build_clip(clip_dir, clip_tokenizer)
    fixtures = run_published(ns, clip_dir, llm_tokenizer, clip_tokenizer)
    torch.save(fixtures, args.out / "cases.pt")
    print(f"wrote {len(fixtures['cases'])} selection cases and {len(fixtures['text_cases'])} text cases to {args.out}")


if __name__ == "__main__":
    main()
