"""LLaVA-NeXT (any-resolution tiles) on a tiny random model saved and loaded back."""

import pytest
import torch
from conftest import random_image

from vtc.methods import Budget, Method, Origin, Selection, Signal, VTCError, get
from vtc.methods.base import available
from vtc.methods.llm_base import LLMMethod
from vtc.models.llava_next import LlavaNextAdapter, split_budget
from vtc.testing import save_tiny_llava_next

from test_in_llm import LLM_OPTIONS
from test_llava_adapter import KeepAboveMean

QUESTIONS = ["what is the color ?", "how many circle ?", "describe the picture ."]
# (height, width): 1x2, 2x1 and 2x2 tile canvases, the first two unpadded, so N differs per image
SIZES = [(40, 52), (90, 30), (64, 64)]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("next") / "llava_next", text_layers=4)


@pytest.fixture(scope="module")
def next_pipe(next_dir, tiny_dirs):
    from vtc.pipeline import Pipeline

    return Pipeline.from_pretrained(next_dir, clip=tiny_dirs[1])


@pytest.fixture
def next_images():
    return [random_image(i + 1, size) for i, size in enumerate(SIZES)]


def stock_text(pipe, inputs, n=6):
    out = pipe.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=pipe.pad_token_id)
    return [t.strip() for t in pipe.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def test_adapter_is_picked_from_model_type(next_pipe):
    assert isinstance(next_pipe.adapter, LlavaNextAdapter)
    assert next_pipe.adapter.language_model is next_pipe.model.model.language_model


def test_none_is_token_for_token_stock_generate_single_and_padded_batch(next_pipe, next_images):
    check_none_is_stock_generate(next_pipe, next_images, QUESTIONS)


def check_none_is_stock_generate(pipe, images, questions):
    """Shared by every tiled family's tests: batch 1, then the whole batch (padded, mixed layouts)."""
    for imgs, qs in [(images[:1], questions[:1]), (images, questions)]:
        inputs = pipe.prepare(imgs, qs)
        ours = pipe.generate(inputs, qs, "none", "auto", max_new_tokens=6)
        assert [r.text for r in ours] == stock_text(pipe, inputs)
        placeholders = (inputs["input_ids"] == pipe.adapter.image_token_id).sum(1).tolist()
        assert [r.tokens_before for r in ours] == [r.tokens_after for r in ours] == placeholders
    assert len(set(placeholders)) == len(images), "the batch should mix tile layouts"


def original_positions(layout, selection):
    """Position in the stock image sequence of every kept patch and of every newline the row rule keeps,
    computed from the layout alone: base patch j -> j; canvas cell (r, c) -> P + r (W'+1) + c; row r's newline
    -> P + r (W'+1) + W'."""
    p, width = layout.patches, layout.canvas.shape[1]
    kept = sorted(int(selection.source_index[i]) for i in range(selection.num_tokens) if selection.origin[i] != Origin.MERGED)
    out, rows = [], []
    for pos in kept:
        if pos < p:
            out.append(pos)
            continue
        r, c = divmod(pos - p, width)
        if rows and rows[-1] != r:
            out.append(p + rows[-1] * (width + 1) + width)
        if not rows or rows[-1] != r:
            rows.append(r)
        out.append(p + r * (width + 1) + c)
    if rows:
        out.append(p + rows[-1] * (width + 1) + width)
    return out


@pytest.mark.parametrize("per_tile", [False, True])
def test_pruning_equals_masking(next_pipe, next_images, per_tile):
    check_pruning_equals_masking(next_pipe, next_images, QUESTIONS, per_tile)


def check_pruning_equals_masking(pipe, images, questions, per_tile):
    """Logits of the pruned prompt, at the kept rows' original positions, equal the full model's with the
    dropped image tokens masked out."""
    for b, image in enumerate(images):
        inputs = pipe.prepare([image], questions[b : b + 1])
        [sel], _ = pipe.compress(inputs, questions[b : b + 1], get("fastervlm"), Budget.parse(0.3), per_tile=per_tile)
        projected = pipe.adapter.project([sel])
        ids, mask = pipe.adapter.splice_ids(
            inputs["input_ids"], inputs["attention_mask"], [projected[0].shape[0]], pipe.pad_token_id,
            expected=pipe.adapter.tokens_before(inputs),
        )
        image_rows = (inputs["input_ids"][0] == pipe.adapter.image_token_id).nonzero().squeeze(1)
        start, end = int(image_rows[0]), int(image_rows[-1]) + 1
        kept_rows = [start + q for q in original_positions(sel.layout, sel)]
        rows = list(range(start)) + kept_rows + list(range(end, inputs["input_ids"].shape[1]))
        assert len(rows) == ids.shape[1]
        full_mask = torch.zeros_like(inputs["attention_mask"])
        full_mask[0, rows] = 1
        length = inputs["input_ids"].shape[1]
        with torch.no_grad():
            full = pipe.model(**{**inputs, "attention_mask": full_mask}, position_ids=torch.arange(length)[None]).logits
            pruned = pipe.model(
                input_ids=ids, attention_mask=mask, position_ids=torch.tensor(rows)[None],
                mm_encoder_outputs=pipe.adapter.image_inputs(projected),
            ).logits
        torch.testing.assert_close(pruned[0], full[0, rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method,budget,per_tile",
    [(KeepAboveMean(), "auto", False), ("recoverable", "auto", False), ("prumerge", "auto", True), ("fastervlm", 12, True),
     ("pool", 7, False)],
)
def test_mixed_tile_batch_with_different_k_matches_single_runs(next_pipe, next_images, method, budget, per_tile):
    check_batch_equals_single_runs(next_pipe, next_images, QUESTIONS, method, budget, per_tile)


def check_batch_equals_single_runs(pipe, images, questions, method, budget, per_tile):
    batch = pipe(images, questions, method=method, budget=budget, max_new_tokens=5, per_tile=per_tile)
    singles = [pipe([i], [q], method=method, budget=budget, max_new_tokens=5, per_tile=per_tile)[0]
               for i, q in zip(images, questions)]
    assert [r.tokens_after for r in batch] == [r.tokens_after for r in singles]
    assert [r.text for r in batch] == [r.text for r in singles]
    for a, b in zip(batch, singles):
        assert torch.equal(a.selection.owner, b.selection.owner)
    if isinstance(method, KeepAboveMean):
        assert len({r.tokens_after for r in batch}) > 1


def test_global_budget_counts_patches_of_the_whole_image(next_pipe, next_images):
    results = next_pipe(next_images, QUESTIONS, method="fastervlm", budget=0.25, max_new_tokens=2)
    for r, image in zip(results, next_images):
        layout = r.selection.layout
        n = layout.num_candidates
        assert r.selection.num_patches == n and r.selection.num_tokens == Budget.parse(0.25).tokens(n)
        assert r.tokens_after == r.selection.num_tokens + r.selection.info["newline_tokens"]
        assert r.selection.info["scope"] == "global"
        # global ranking: the kept tokens are the top CLS attention of all candidates together
        inputs = next_pipe.prepare([image], QUESTIONS[:1])
        crops = next_pipe.adapter.signals(next_pipe.adapter.crop_pixels(inputs, [layout]), frozenset({Signal.CLS_ATTN}),
                                          get("fastervlm").attention)
        attn = crops.cls_attn.flatten()[layout.candidates()]
        top = set(attn.topk(r.selection.num_tokens).indices.tolist())
        assert set(r.selection.kept_indices().tolist()) == top


def test_per_tile_split_follows_the_tiles(next_pipe, next_images):
    [r] = next_pipe(next_images[2:], QUESTIONS[:1], method="fastervlm", budget=20, per_tile=True, max_new_tokens=2)
    layout = r.selection.layout
    segments = layout.segments()
    assert len(segments) == 5  # base + 2x2 tiles of a square image: nothing unpadded
    shares = [int(str(b)) for b in split_budget(Budget.parse(20), [len(p) for p, _ in segments])]
    kept = r.selection.kept_indices()
    assert [int(torch.isin(kept, positions).sum()) for positions, _ in segments] == shares == [4, 4, 4, 4, 4]


def test_split_budget_by_hand():
    parts = split_budget(Budget.parse(10), [16, 8, 8])
    assert [str(p) for p in parts] == ["5", "3", "2"]  # 5, 2.5, 2.5: one remainder, to the earlier part
    assert split_budget(Budget.parse(1), [16, 8, 8])[1:] == [None, None]
    assert split_budget(Budget.parse(0.5), [16, 8]) == [Budget.parse(0.5)] * 2
    with pytest.raises(VTCError, match="more than"):
        split_budget(Budget.parse(40), [16, 8, 8])


def test_unpadded_layout_matches_the_stock_feature_count(next_pipe):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    adapter = next_pipe.adapter
    for size in [(40, 52), (90, 30), (20, 95), (64, 64), (33, 200)]:
        layout = adapter.layout(size)
        feats = [torch.zeros(layout.crops, adapter.num_patches, 2)]
        packed, lens = LlavaNextModel.pack_image_features(next_pipe.model.model, feats, torch.tensor([size]), "default",
                                                          image_newline=torch.zeros(2))
        assert int(lens[0]) == layout.num_tokens
        selection = Selection.build(torch.zeros(layout.num_candidates, 2), torch.arange(3))
        selection.layout = layout
        panels = adapter.map_panels(selection)
        assert torch.equal(torch.cat([index for _, index, _ in panels]), torch.arange(layout.num_candidates))
        for _, index, boxes in panels:  # each view tiles the whole picture: areas sum to 1, nothing outside
            assert boxes.shape == (len(index), 4) and boxes.min() >= 0 and boxes.max() <= 1
            area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
            assert abs(float(area) - 1) < 1e-9


@pytest.mark.parametrize("name", available())
def test_every_method_runs_or_refuses_clearly(next_pipe, next_images, name):
    refused = {"downsample": "tiles are not supported", "tome_tower": "in-tower hook is not wired for llava-next",
               "flowcut": "in-tower hook is not wired for llava-next"}
    check_runs_or_refuses(next_pipe, next_images, QUESTIONS, name, refused)


def check_runs_or_refuses(pipe, images, questions, name, refused: dict[str, str], llm_budget=24):
    """Method ``name`` runs on the batch, or (``refused[name]``: a pattern of its message) refuses clearly."""
    method = get(name)
    in_llm = isinstance(method, LLMMethod)
    budget = llm_budget if in_llm else ("auto" if method.supports_auto else 0.3)
    options = LLM_OPTIONS[name] if in_llm else {}
    if name in refused:
        with pytest.raises(VTCError, match=refused[name]):
            pipe(images, questions, method=name, budget=budget, max_new_tokens=2)
        return
    results = pipe(images, questions, method=name, budget=budget, max_new_tokens=2, **options)
    for r in results:
        assert 1 <= r.tokens_after <= r.tokens_before
        assert r.selection.num_patches == r.selection.layout.num_candidates
        if in_llm:  # the language model kept the budget's image tokens after its pruning layer
            assert 1 <= r.selection.info["llm_kept"] <= r.tokens_before


def test_cli_run_on_llava_next_per_tile(next_dir, next_images, tmp_path):
    import json

    from typer.testing import CliRunner

    from vtc.cli import app

    image = tmp_path / "wide.png"
    next_images[0].save(image)
    args = ["run", "--model", str(next_dir), "--image", str(image), "--question", QUESTIONS[0], "--method", "fastervlm",
            "--budget", "12", "--max-new-tokens", "2", "--json"]
    for extra, scope in [([], "global"), (["--per-tile"], "per_tile")]:
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert record["info"]["scope"] == scope and record["provenance"]["kept"] == 12
        assert record["tokens_after"] == 12 + record["info"]["newline_tokens"] and record["tokens_before"] == 70


def test_bench_runs_on_llava_next_with_budgets_above_one_crop(next_pipe, tmp_path):
    from vtc.bench.runner import BenchRunner, make_plan
    from vtc.bench.store import read_records

    plan = make_plan(next_pipe, ["synthetic"], ["none", "fastervlm"], ["20"], 2)  # 20 > 16 patches of one crop
    assert BenchRunner(next_pipe, tmp_path / "out", batch_size=2).run(plan) == 4
    records = read_records(tmp_path / "out")
    assert all(r["error"] is None for r in records), records
    kept = {r["method"]: r["tokens_kept"] for r in records}
    assert kept["fastervlm"] >= 20 and kept["none"] > kept["fastervlm"]
    assert (tmp_path / "out" / "maps").exists()
