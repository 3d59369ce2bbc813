"""VisPruner against the official code (fixtures), an independent loop over its rule, and hand-worked cases.

The fixtures come from scripts/make_vispruner_fixtures.py, which ran the official ``encode_images`` (and, for
the tower cases, the official ``CLIPVisionTower`` with eager attention) loaded from a snapshot of
https://github.com/Theia-4869/VisPruner at run time.
"""

import math
from pathlib import Path

import pytest
import torch

from vtc.methods import Budget, Signals, VTCError, get
from vtc.methods.vispruner import split_budget

from conftest import random_image

FIXTURES = Path(__file__).parent / "fixtures" / "vispruner" / "cases.pt"


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURES)


def grid_of(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def signals_of(features: torch.Tensor, cls_attn: torch.Tensor) -> Signals:
    return Signals(features=features, grid=grid_of(features.shape[1]), cls_attn=cls_attn)


def masked_indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().squeeze(1).tolist()


# ----------------------------------------------------------------------------- parity with the official code


def test_matches_the_official_selection_on_seeded_tensors(official):
    compared = 0
    for case in official["tensors"]:
        features, attentions = case["features"].float(), case["attentions"].float()
        sig = signals_of(features, attentions.mean(1))  # the official head mean, in the same dtype
        for (t, ratio), masks in zip(case["settings"], case["masks"]):
            for b, sel in enumerate(get("vispruner", important_ratio=ratio).select(sig, t)):
                expected = masked_indices(masks[b])
                assert sel.kept_indices().tolist() == expected, (case["n"], case["seed"], t, ratio, b)
                torch.testing.assert_close(sel.tokens, features[b, expected], atol=1e-4, rtol=0)
                compared += 1
    assert compared >= 200  # every shape, seed and most budgets produced an official result


def tiny_llava_with(tower_config: dict, state: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tower_config).to_dict(), text_config=text.to_dict(), image_token_id=63,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def test_matches_the_official_tower_features_and_attention_layer(official):
    """vtc's adapter (SDPA, the CLS row from layer -2's q/k) gives the official eager-attention selection."""
    from vtc.models.llava import LlavaAdapter

    tower = official["tower"]
    adapter = LlavaAdapter(tiny_llava_with(tower["config"], tower["state"]))
    pixels = tower["pixel_values"].float()
    for (t, ratio), masks in zip(tower["settings"], tower["masks"]):
        method = get("vispruner", important_ratio=ratio)
        sig = adapter.signals(pixels, method.needs, method.attention)
        for b, sel in enumerate(method.select(sig, t)):
            expected = masked_indices(masks[b])
            assert sel.kept_indices().tolist() == expected, (t, ratio, b)
            torch.testing.assert_close(sel.tokens, tower["features"][b, expected], atol=1e-4, rtol=1e-4)


def test_budgets_the_official_loop_cannot_run_give_exact_counts_by_the_same_rule(official):
    """Where the official code raised (odd lists, rounds larger than the A list) or kept T - 1 tokens, vtc keeps
    T distinct patches, the independent loop's (on the 64-patch inputs: the loop is slow in pure Python)."""
    failures = official["failures"]
    assert any("kept" in f["error"] for f in failures) and any("kept" not in f["error"] for f in failures)
    inputs = {(c["n"], c["seed"]): c for c in official["tensors"]}
    for f in failures:
        case = inputs[(f["n"], f["seed"])]
        sig = signals_of(case["features"].float(), case["attentions"].float().mean(1))
        for b, sel in enumerate(get("vispruner", important_ratio=f["ratio"]).select(sig, f["t"])):
            kept = sel.kept_indices().tolist()
            assert sel.num_tokens == f["t"] and len(set(kept)) == f["t"]
            if f["n"] == 64 and f["seed"] == 0:
                assert kept == naive_vispruner(sig.cls_attn[b].tolist(), sig.features[b].tolist(), f["t"], f["ratio"])


# ----------------------------------------------------------------------------- an independent loop over the rule


def naive_cosine(u: list[float], v: list[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v))
    norm = math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))
    return dot / norm if norm else 0.0


def naive_vispruner(attention: list[float], features: list[list[float]], t: int, ratio: float) -> list[int]:
    """The official rule on Python lists, with every round capped at the A list's size (vtc's documented
    generalisation); ties: Python's sort is stable (earlier first)."""
    important_count = int(t * ratio)
    diverse = t - important_count
    ranked = sorted(range(len(attention)), key=lambda i: -attention[i])
    important, residual = ranked[:important_count], ranked[important_count:]
    if diverse == 0:
        return sorted(important)
    while True:
        count = len(residual)
        drop = min(8, count - diverse, (count + 1) // 2)
        if drop <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        score = [max(naive_cosine(features[i], features[j]) for j in b) for i in a]
        by_score = sorted(range(len(a)), key=lambda p: -score[p])
        residual = [a[p] for p in by_score[drop:]] + b
    return sorted(important + residual)


def assert_matches_naive(sig: Signals, budgets, ratios):
    for ratio in ratios:
        method = get("vispruner", important_ratio=ratio)
        for t in budgets:
            for b, sel in enumerate(method.select(sig, t)):
                expected = naive_vispruner(sig.cls_attn[b].tolist(), sig.features[b].tolist(), t, ratio)
                assert sel.kept_indices().tolist() == expected, (t, ratio, b)
                assert sel.info == {"important": int(t * ratio), "diverse": t - int(t * ratio)}


@pytest.mark.parametrize("n", [36, 35])  # 35: odd residual lists, where the official loop breaks
def test_every_budget_matches_a_naive_loop(n):
    g = torch.Generator().manual_seed(n)
    centres = torch.randn(3, 6, 8, generator=g)
    features = centres[:, torch.randint(0, 6, (n,), generator=g)] + 0.2 * torch.randn(3, n, 8, generator=g)
    sig = signals_of(features, torch.rand(3, n, generator=g).softmax(-1))
    assert_matches_naive(sig, range(1, n + 1), [0.5])
    assert_matches_naive(sig, [1, 2, 5, 9, 17, 30], [0.0, 0.3, 0.75, 1.0])


def test_ties_match_a_naive_loop_that_breaks_them_in_list_order():
    """One-hot features (cosines exactly 0 or 1: duplicates tie) and attention on three levels."""
    g = torch.Generator().manual_seed(5)
    n = 40
    features = torch.nn.functional.one_hot(torch.randint(0, 6, (2, n), generator=g), 8).float()
    attention = torch.randint(0, 3, (2, n), generator=g).float() / 10
    assert_matches_naive(signals_of(features, attention), [1, 3, 8, 13, 20, 33, 40], [0.5, 0.0, 0.75])


# ----------------------------------------------------------------------------- hand-worked cases and edges


def hand_case(second: list[float], seventh: list[float]) -> Signals:
    """8 patches; attention ranks 6, 1 (important at T=4, ratio 0.5), then 0, 2, 3, 4, 5, 7 (the residual list).
    Round 1 (R=6, 2 diverse wanted, drop min(8, 4, 3) = 3) drops A = 0, 3, 5 whatever their scores; round 2 has
    A = 2, 7 and B = 4 and drops the A-token more similar to patch 4."""
    attention = torch.tensor([0.12, 0.2, 0.11, 0.1, 0.09, 0.08, 0.25, 0.05])
    features = torch.tensor([[0.0, 1.0]] * 8)
    features[4] = torch.tensor([1.0, 0.0])
    features[2], features[7] = torch.tensor(second), torch.tensor(seventh)
    return signals_of(features[None], attention[None])


def test_hand_worked_round_drops_the_more_similar_token():
    [sel] = get("vispruner").select(hand_case([1.0, 0.1], [0.0, 1.0]), 4)  # 2 is 4's near-duplicate
    assert sel.kept_indices().tolist() == [1, 4, 6, 7]
    [sel] = get("vispruner").select(hand_case([0.0, 1.0], [1.0, -0.1]), 4)  # now 7 is
    assert sel.kept_indices().tolist() == [1, 2, 4, 6]


def test_hand_worked_tie_drops_the_earlier_list_position():
    [sel] = get("vispruner").select(hand_case([1.0, 1.0], [1.0, -1.0]), 4)  # cos 0.7071 to patch 4, both
    assert sel.kept_indices().tolist() == [1, 4, 6, 7]


def test_equal_attention_ranks_the_lower_index_first():
    sig = signals_of(torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0)), torch.full((1, 16), 1 / 16))
    [sel] = get("vispruner", important_ratio=1.0).select(sig, 5)
    assert sel.kept_indices().tolist() == [0, 1, 2, 3, 4]


def test_edges_budget_one_budget_n_and_the_two_extreme_ratios():
    g = torch.Generator().manual_seed(2)
    sig = signals_of(torch.randn(2, 64, 8, generator=g), torch.rand(2, 64, generator=g))
    for ratio in (0.0, 0.5, 1.0):
        for sel in get("vispruner", important_ratio=ratio).select(sig, 1):
            assert sel.num_tokens == 1
        for sel in get("vispruner", important_ratio=ratio).select(sig, 64):
            assert sel.kept_indices().tolist() == list(range(64))
    top = sig.cls_attn.argmax(-1).tolist()
    assert [s.kept_indices().tolist() for s in get("vispruner", important_ratio=1.0).select(sig, 1)] == [[i] for i in top]
    fastervlm = get("fastervlm").select(sig, 20)  # all important: FasterVLM's top-T
    for mine, theirs in zip(get("vispruner", important_ratio=1.0).select(sig, 20), fastervlm):
        assert mine.kept_indices().tolist() == theirs.kept_indices().tolist()


def test_split_rounds_the_important_share_down():
    assert split_budget(64, 0.5) == (32, 32)
    assert split_budget(64, 0.75) == (48, 16)
    assert split_budget(32, 0.4) == (12, 20)  # 12.8
    assert split_budget(58, 0.5) == (29, 29)
    assert split_budget(100, 0.29) == (28, 72)  # 100 * 0.29 = 28.999999999999996 in floats, as Python's int reads it


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), "0.5", True, None])
def test_bad_important_ratio_is_named(bad):
    with pytest.raises(VTCError, match="vispruner: important_ratio"):
        get("vispruner", important_ratio=bad)


def test_auto_budget_is_refused():
    sig = signals_of(torch.randn(1, 16, 4), torch.rand(1, 16))
    with pytest.raises(VTCError, match="auto"):
        get("vispruner").select(sig, "auto")


def test_with_text_recovery_runs_end_to_end(tiny_pipe):
    results = tiny_pipe([random_image(30), random_image(31)], ["is there a red square ?"] * 2,
                        method="vispruner+text", budget=6, max_new_tokens=1)
    assert [r.tokens_after for r in results] == [Budget.parse(6).tokens(16)] * 2
