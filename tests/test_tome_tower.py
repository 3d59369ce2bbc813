"""ToMe inside the tower (methods/tome_tower.py) against a naive per-layer loop of the paper's steps."""

import math

import pytest
import torch

from vtc.methods import Budget, Origin, VTCError, get
from vtc.methods.tome_tower import merge_schedule
from vtc.models.tower_loop import run_tower
from test_tower_loop import first_input, pixels, tower  # noqa: F401  (the same tiny CLIP tower and pixels)

HEADS = 4  # the shared tiny tower's heads (clip_configs' default)




def cosine(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


@torch.no_grad()
def naive_tome_tower(tower, x, depth, schedule, proportional):
    """One image (T, D), as plain loops: eager attention per head with log(size) on the logits, ToMe's
    matching by hand (the CLS never merges), size-weighted merges, then the MLP. Returns [(patches, state)]."""
    tokens = list(x)
    size = [1.0] * len(tokens)
    groups = [[]] + [[p] for p in range(len(tokens) - 1)]
    for i in range(depth):
        layer = tower.encoder.layers[i]
        attn = layer.self_attn
        h = layer.layer_norm1(torch.stack(tokens))
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        hd = q.shape[1] // HEADS
        heads = []
        for head in range(HEADS):
            cols = slice(head * hd, (head + 1) * hd)
            logits = q[:, cols] @ k[:, cols].T * hd**-0.5
            if proportional:
                logits = logits + torch.tensor([math.log(s) for s in size])[None, :]
            heads.append(logits.softmax(-1) @ v[:, cols])
        after = torch.stack(tokens) + attn.out_proj(torch.cat(heads, dim=1))
        metric = k.view(len(tokens), HEADS, hd).mean(1)
        a_set, b_set = list(range(0, len(tokens), 2)), list(range(1, len(tokens), 2))
        edges = []
        for a in a_set[1:]:
            sims = [cosine(metric[a], metric[b]) for b in b_set]
            best = sims.index(max(sims))
            edges.append((sims[best], a, b_set[best]))
        edges.sort(key=lambda e: (-e[0], e[1]))
        into = {a: b for _, a, b in edges[: schedule[i]]}
        new_tokens, new_size, new_groups = [], [], []
        for a in a_set:
            if a not in into:
                new_tokens.append(after[a]), new_size.append(size[a]), new_groups.append(groups[a])
        for b in b_set:
            parts = [b] + [a for a in into if into[a] == b]
            total = sum(size[p] for p in parts)
            new_tokens.append(sum(size[p] * after[p] for p in parts) / total)
            new_size.append(total)
            new_groups.append(sorted(p for part in parts for p in groups[part]))
        x = torch.stack(new_tokens)
        x = x + layer.mlp(layer.layer_norm2(x))
        tokens, size, groups = list(x), new_size, new_groups
    return list(zip(groups[1:], tokens[1:]))


def run_method(tower, pixels, budget, depth=3, **options):
    method = get("tome_tower", **options)
    reducer = method.reducer(Budget.parse(budget), 36, depth, 1)
    state = run_tower(tower.encoder.layers[:depth], first_input(tower, pixels), reducer, 1, HEADS)
    return state.selections(), reducer.schedule


@pytest.mark.parametrize("budget, proportional", [(9, True), (5, True), (0.5, True), (34, True), (9, False)])
def test_matches_a_naive_loop_of_the_papers_steps(tower, pixels, budget, proportional):
    selections, schedule = run_method(tower, pixels, budget, proportional=proportional)
    for b, sel in enumerate(selections):
        expected = naive_tome_tower(tower, first_input(tower, pixels)[b], 3, schedule, proportional)
        assert sel.num_tokens == len(expected) == Budget.parse(budget).tokens(36)
        got = {tuple(sorted(src.tolist())): sel.tokens[j] for j, src in enumerate(sel.sources)}
        assert sorted(got) == sorted(tuple(g) for g, _ in expected)
        for group, token in expected:
            torch.testing.assert_close(got[tuple(group)], token, rtol=0, atol=1e-4)
        single = [j for j, s in enumerate(sel.sources) if len(s) == 1]
        assert (sel.origin[single] == Origin.KEPT).all() and (sel.origin[sel.source_sizes > 1] == Origin.MERGED).all()
        kept = sel.kept_indices().tolist()
        assert kept == sorted(kept) and sel.num_tokens == len(kept) + sel.counts()["merged"]
        assert (sel.owner >= 0).all()  # ToMe drops nothing: every patch has its token


def test_proportional_attention_changes_the_result(tower, pixels):
    with_bias, _ = run_method(tower, pixels, 9)
    without, _ = run_method(tower, pixels, 9, proportional=False)
    differs = [not torch.allclose(a.tokens, b.tokens, atol=1e-3) if a.num_tokens == b.num_tokens else True
               for a, b in zip(with_bias, without)]
    assert any(differs)


def test_schedule_is_constant_r_with_the_remainder_first_and_capped_at_the_end():
    assert merge_schedule(576, 64, 23) == [23] * 6 + [22] * 17  # LLaVA-1.5 at 64 tokens
    assert merge_schedule(16, 5, 2) == [6, 5]
    assert merge_schedule(36, 5, 3) == [16, 10, 5]  # constant 11, 10, 10 breaks the half limit at the end
    assert merge_schedule(16, 16, 2) == [0, 0]
    for n, k, depth in [(16, 3, 2), (576, 1, 9)]:
        with pytest.raises(VTCError, match=f"budget {k} cannot be reached.* down to {math.ceil(n / 2**depth)} at the fewest"):
            merge_schedule(n, k, depth)
    with pytest.raises(VTCError, match="no vision layer runs before the feature layer"):
        merge_schedule(16, 5, 0)
    assert merge_schedule(16, 16, 0) == []


@pytest.mark.parametrize("n, depth", [(7, 1), (16, 2), (36, 3), (50, 4)])
def test_every_reachable_budget_gets_a_schedule_within_the_half_limit(n, depth):
    """Against the limit itself, layer by layer: with the CLS protected a layer of n patch tokens merges
    at most n // 2; every k down to ceil(n / 2^depth) is reached exactly, every k below it refused."""
    for k in range(1, n + 1):
        if k < math.ceil(n / 2**depth):
            with pytest.raises(VTCError, match="cannot be reached"):
                merge_schedule(n, k, depth)
            continue
        schedule, tokens = merge_schedule(n, k, depth), n
        for r in schedule:
            assert 0 <= r <= tokens // 2
            tokens -= r
        assert tokens == k


def test_refusals_are_clear(tower, pixels):
    method = get("tome_tower")
    with pytest.raises(VTCError, match="auto"):
        method.reducer(Budget.parse("auto"), 36, 3, 1)
    with pytest.raises(VTCError, match="more than"):
        method.reducer(Budget.parse(37), 36, 3, 1)
    with pytest.raises(VTCError, match="proportional"):
        get("tome_tower", proportional="yes")
    with pytest.raises(VTCError, match="protects one CLS token, the tower has 2"):
        method.reducer(Budget.parse(9), 36, 3, 2)
    assert method.reducer(Budget.parse(9), 36, 3, 1).info == {"r": [9, 9, 9], "proportional": True}
    with pytest.raises(VTCError, match="inside the vision tower"):
        from test_zoo import fake_signals

        method.select(fake_signals(), 9)
    with pytest.raises(VTCError, match="tome_tower.*never computes"):
        get("tome_tower+text")


def test_runs_through_the_llava_pipeline_and_equals_the_hook(tiny_pipe, images):
    """The adapter path: exact counts, and the same tokens as the hook run on the model's own tower."""
    from conftest import random_image  # noqa: F401  (same images as the other pipeline tests)

    questions = ["what is it ?"] * 2
    results = tiny_pipe(images[:2], questions, method="tome_tower", budget=5, max_new_tokens=2)
    adapter = tiny_pipe.adapter
    inputs = tiny_pipe.prepare(images[:2], questions)
    reducer = get("tome_tower").reducer(Budget.parse(5), 16, adapter.feature_index, 1)
    with torch.no_grad():
        hidden = adapter.embed(inputs["pixel_values"], False)
        state = run_tower(adapter.tower.encoder.layers[:2], hidden, reducer, 1, adapter.num_heads)
    for r, sel in zip(results, state.selections()):
        assert r.tokens_after == 5 and r.tokens_before == 16 and r.selection.info["r"] == [6, 5]
        torch.testing.assert_close(r.selection.tokens, sel.tokens)
        assert [s.tolist() for s in r.selection.sources] == [s.tolist() for s in sel.sources]
    every = tiny_pipe(images[:2], questions, method="tome_tower", budget=1.0, max_new_tokens=3)
    stock = tiny_pipe(images[:2], questions, method="none", budget="auto", max_new_tokens=3)
    for a, b in zip(every, stock):  # nothing merged: the stock feature layer, the stock answer
        assert torch.equal(a.selection.tokens, b.selection.tokens) and a.text == b.text
    with pytest.raises(VTCError, match="budget 3 cannot be reached.*4 at the fewest"):
        tiny_pipe(images[:1], questions[:1], method="tome_tower", budget=3, max_new_tokens=1)


def test_half_precision_tower_gives_tokens_in_its_dtype(tower, pixels):
    """On a GPU the tower runs in bf16: the size bias goes to SDPA in that dtype, merges sum in float32,
    and the output tokens keep the tower's dtype (the projector's input)."""
    import copy

    half = copy.deepcopy(tower).to(torch.bfloat16)
    selections, _ = run_method(half, pixels.to(torch.bfloat16), 9)
    reference, _ = run_method(tower, pixels, 9)
    same = []
    for sel, ref in zip(selections, reference):
        assert sel.tokens.dtype == torch.bfloat16 and sel.num_tokens == 9
        same.append([s.tolist() for s in sel.sources] == [s.tolist() for s in ref.sources])
        if same[-1]:  # the same merges (bf16 may flip a near tie): values within bf16's rounding
            torch.testing.assert_close(sel.tokens.float(), ref.tokens, rtol=0.05, atol=0.1)
    assert any(same)
