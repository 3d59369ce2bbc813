"""CDPruner against its official code (fixtures from scripts/make_cdpruner_fixtures.py), against a determinant
loop over the paper's formula, and on its edges (ties, budget 1 and N, equal text scores, an exhausted kernel)."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vtc.methods import AttentionSpec, Budget, Signal, Signals, TextSpec, VTCError, get
from vtc.methods.cdpruner import TEXT, conditional_kernel, greedy_map, relevance_weights

from conftest import random_image

FIXTURES = torch.load(Path(__file__).parent / "fixtures" / "cdpruner" / "cases.pt", weights_only=False)
QUESTIONS = ["what color is the small circle ?", "is there a red square ?", "how many shapes ?"]


def mlp(state: dict) -> nn.Module:
    """LLaVA-1.5's mlp2x_gelu projector with the fixture's weights."""
    d_in, d_out = state["0.weight"].shape[1], state["2.weight"].shape[0]
    module = nn.Sequential(nn.Linear(d_in, state["0.weight"].shape[0]), nn.GELU(), nn.Linear(state["2.weight"].shape[1], d_out))
    module.load_state_dict(state)
    return module.eval()


def mean_cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """TEXT_SIM as the CLIP scorer defines it: each patch's cosine with the question, averaged over its segments."""
    unit = nn.functional.normalize
    return (unit(image_embeds, dim=-1) @ unit(text_embeds, dim=-1).T).mean(-1)


def square_grid(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    return (side, n // side)


def fixture_batch(indices: list[int]) -> tuple[Signals, nn.Module]:
    """The fixture inputs ``indices`` (same N and projector) as one batch of signals."""
    items = [FIXTURES["inputs"][i] for i in indices]
    project = mlp(FIXTURES["projectors"][items[0]["projector"]])
    features = torch.stack([it["features"] for it in items])
    with torch.no_grad():
        projected = project(features)
    text_sim = torch.stack([mean_cosine(it["image_embeds"], it["text_embeds"]) for it in items])
    return Signals(features=features, grid=square_grid(features.shape[1]), projected=projected, text_sim=text_sim), project


def groups() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for i, item in enumerate(FIXTURES["inputs"]):
        found.setdefault(item["projector"], []).append(i)
    return found


# ----------------------------------------------------------------------------- parity with the official code


NOISE_GAIN = 1e-4  # relative to the first pick's gain: below it a gain is float32 rounding, not signal


def valid_steps(case: dict) -> int:
    """How many official picks are sound: those before the first whose gain is at rounding level (below
    NOISE_GAIN times the first gain, or not positive: its square root makes the official step NaN and the
    official code then picks tokens 0 and 1 again). Past the kernel's rank every remaining gain is rounding
    noise, and which noise wins depends on the CPU's float32 kernels and thread count (picks of this kind
    matched the fixtures on the machine that made them and not on another), so those picks are not compared."""
    gains = case["gains"]
    unsound = (~(gains > NOISE_GAIN * gains[0])).nonzero()
    return case["k"] if unsound.numel() == 0 else int(unsound[0])


@pytest.mark.parametrize("group", list(groups()))
def test_batched_picks_kept_tokens_and_rows_equal_the_official_code(group):
    """Every image of a group selected in one batch equals the official single-image run: pick order (ties
    included), kept set in raster order, and the projected rows the language model gets. Where the official
    code's gains fall to rounding level (past the kernel's rank), the picks agree up to that step."""
    members = groups()[group]
    signals, project = fixture_batch(members)
    method = get("cdpruner")
    for k in sorted({c["k"] for c in FIXTURES["cases"] if c["input"] in members}):
        order = greedy_map(conditional_kernel(signals.projected, relevance_weights(signals.text_sim)), k)
        selections = method.select(signals, k)
        for b, index in enumerate(members):
            [case] = [c for c in FIXTURES["cases"] if c["input"] == index and c["k"] == k]
            sound = valid_steps(case)
            label = (FIXTURES["inputs"][index]["label"], k)
            assert order[b, :sound].tolist() == case["order"][:sound].tolist(), label
            assert selections[b].num_tokens == k == selections[b].kept_indices().unique().numel()
            if sound == k:
                assert selections[b].kept_indices().tolist() == case["kept"].tolist(), label
            if "rows" in case and sound == k:  # past the rank the kept set itself is rounding's choice
                with torch.no_grad():
                    rows = project(selections[b].tokens)
                torch.testing.assert_close(rows, case["rows"], atol=1e-4, rtol=1e-4)


def test_official_code_keeps_fewer_tokens_once_a_gain_is_not_positive():
    """The deviation vtc's docstring names, seen in the official code: past the kernel's rank (projected width
    48 < budget) a gain goes non-positive, the official picks repeat and fewer than k tokens are kept."""
    def after_nan(case):  # the picks after the first non-positive gain (whose square root is NaN), or None
        bad = (~(case["gains"] > 0)).nonzero()
        return None if bad.numel() == 0 else case["order"][int(bad[0]) + 1 :]

    exhausted = [c for c in FIXTURES["cases"] if after_nan(c) is not None]
    assert len(exhausted) >= 4
    for case in exhausted:
        assert case["kept"].numel() < case["k"]
        assert after_nan(case).unique().tolist() in ([0, 1], [0], [1])


def test_fixture_ties_are_real():
    """The duplicated tokens of the tie case have equal kernel rows and are among the first picks, so the order
    test covers tie breaking: the official code, like vtc, keeps the lower index of each pair."""
    [index] = groups()["duplicates"]
    signals, _ = fixture_batch([index])
    kernel = conditional_kernel(signals.projected, relevance_weights(signals.text_sim))[0]
    pairs = [(5, 40), (12, 13), (0, 63)]
    for a, b in pairs:
        rest = [x for x in range(64) if x not in (a, b)]
        assert torch.equal(kernel[a, rest], kernel[b, rest]) and kernel[a, a] == kernel[b, b]
    [widest] = [c["order"].tolist() for c in FIXTURES["cases"] if c["input"] == index and c["k"] == 32]
    assert widest[:3] == [5, 12, 0] and not {40, 13, 63} & set(widest)


def test_clip_reading_equals_the_official_tower(tiny_dirs):
    """The official CLIPVisionTower.forward's relevance inputs (feature-layer patch states, the question in
    context-long segments) equal vtc's CLIP scorer with CDPruner's TextSpec, and the selection follows."""
    from transformers import CLIPVisionModel

    from vtc.models.clip_text import ClipTextScorer

    scorer = ClipTextScorer.from_pretrained(tiny_dirs[1])
    vision = CLIPVisionModel.from_pretrained(tiny_dirs[1]).eval()
    case0 = FIXTURES["clip"][0]
    fingerprint = float(scorer.text_model.text_projection.weight.sum() + scorer.projection.sum())
    assert abs(fingerprint - case0["fingerprint"]) < 1e-4, "the tiny CLIP differs from the one the fixtures were made with"
    assert {c["segments"] for c in FIXTURES["clip"]} == {1, 2}
    for case in FIXTURES["clip"]:
        with torch.no_grad():
            states = vision(case["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
            projected = mlp(case["projector"])(states)
        text_sim = scorer.similarity(states, [case["question"]], get("cdpruner").text)  # what the method declares
        torch.testing.assert_close(text_sim[0], case["cosine"], atol=1e-5, rtol=1e-5)
        signals = Signals(features=states, grid=(4, 4), projected=projected, text_sim=text_sim)
        [selection] = get("cdpruner").select(signals, case["k"])
        assert selection.kept_indices().tolist() == case["kept"].tolist()
        order = greedy_map(conditional_kernel(projected, relevance_weights(text_sim)), case["k"])[0]
        assert order.tolist() == case["order"].tolist()
    long = next(c for c in FIXTURES["clip"] if c["segments"] == 2)
    with torch.no_grad():
        final = vision(long["pixel_values"]).last_hidden_state[:, 1:]
        feature = vision(long["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    for other in (scorer.similarity(final, [long["question"]], TEXT), scorer.similarity(feature, [long["question"]], TextSpec(patch_states="feature"))):
        assert not torch.allclose(other[0], long["cosine"], atol=1e-3)  # the final layer / a truncated question differ


# ----------------------------------------------------------------------------- the paper's formula, by a naive loop


def naive_cdpruner(vectors: list[list[float]], text_sim: list[float], k: int, negate: bool = True, theta=None) -> list[int]:
    """Greedy MAP by its definition: each step adds the token that maximises det(L_S), L = diag(r) S diag(r),
    S the cosine similarity, r the min-max normalised (negated) text score. Python floats and a float64 det."""
    n = len(vectors)
    norm = [math.sqrt(sum(x * x for x in v)) for v in vectors]
    score = [-s if negate else s for s in text_sim]
    low, high = min(score), max(score)
    r = [(s - low + 1e-6) / (high - low) if high > low else 1.0 for s in score]
    if theta is not None:
        r = [math.exp(theta / (2 * (1 - theta)) * x) for x in r]
    kernel = torch.tensor(
        [[r[i] * sum(a * b for a, b in zip(vectors[i], vectors[j])) / (norm[i] * norm[j]) * r[j] for j in range(n)] for i in range(n)],
        dtype=torch.float64,
    )
    chosen: list[int] = []
    for _ in range(k):
        best, best_det = None, -math.inf
        for j in range(n):
            if j in chosen:
                continue
            det = float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]]))
            if det > best_det:  # strictly better: equal determinants keep the lower index
                best, best_det = j, det
        chosen.append(best)
    return chosen


def small_signals(n=12, d=16, seed=0, batch=1, constant_text=False) -> Signals:
    g = torch.Generator().manual_seed(seed)
    text = torch.full((batch, n), 0.25) if constant_text else torch.rand(batch, n, generator=g) * 2 - 1
    return Signals(features=torch.randn(batch, n, 6, generator=g), grid=(3, n // 3),
                   projected=torch.randn(batch, n, d, generator=g), text_sim=text)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("options", [{}, {"relevance": "direct"}, {"theta": 0.5}])
def test_picks_maximise_the_determinant_step_by_step(seed, options):
    sig = small_signals(seed=seed)
    negate = options.get("relevance", "negated") == "negated"
    for k in (1, 3, 6, 11):
        expected = naive_cdpruner(sig.projected[0].tolist(), sig.text_sim[0].tolist(), k, negate, options.get("theta"))
        weights = relevance_weights(sig.text_sim.double(), options.get("relevance", "negated"), options.get("theta"))
        assert greedy_map(conditional_kernel(sig.projected.double(), weights).double(), k)[0].tolist() == expected
        [sel] = get("cdpruner", **options).select(sig, k)
        assert sel.kept_indices().tolist() == sorted(expected)


def test_equal_text_scores_give_the_unconditional_dpp():
    """Every token equally relevant: the official code divides by zero; vtc's weights are 1, i.e. the DPP on S.
    The tokens are +-1 vectors of width 16, so every cos(x_i, x_i) is exactly 1: the first pick is a true tie
    (the lowest index wins), not a race between rounding errors."""
    sig = small_signals(seed=3, constant_text=True)
    sig.projected = sig.projected.sign()
    assert torch.equal(relevance_weights(sig.text_sim), torch.ones_like(sig.text_sim))
    assert get("cdpruner").select(sig, 1)[0].kept_indices().tolist() == [0]
    for k in (1, 4, 7):
        [sel] = get("cdpruner").select(sig, k)
        assert sel.kept_indices().tolist() == sorted(naive_cdpruner(sig.projected[0].tolist(), [0.0] * 12, k))


def test_budget_one_keeps_the_most_relevant_token_and_budget_n_keeps_all():
    sig = small_signals(seed=4, batch=2)
    [a, b] = get("cdpruner").select(sig, 1)  # gain_i = r_i^2 cos(x_i, x_i): the largest weight wins
    assert [a.kept_indices().item(), b.kept_indices().item()] == sig.text_sim.argmin(-1).tolist()
    [a, b] = get("cdpruner", relevance="direct").select(sig, 1)
    assert [a.kept_indices().item(), b.kept_indices().item()] == sig.text_sim.argmax(-1).tolist()
    for sel in get("cdpruner").select(sig, 12):
        assert sel.kept_indices().tolist() == list(range(12))


def test_relevance_weights_by_hand():
    text = torch.tensor([[0.5, -0.5, 0.0, 0.25]])
    # negated scores -0.5, 0.5, 0, -0.25: min -0.5, spread 1, so r = -s + 0.5 + 1e-6
    torch.testing.assert_close(relevance_weights(text), torch.tensor([[1e-6, 1 + 1e-6, 0.5 + 1e-6, 0.25 + 1e-6]]))
    torch.testing.assert_close(relevance_weights(text, "direct"), torch.tensor([[1 + 1e-6, 1e-6, 0.5 + 1e-6, 0.75 + 1e-6]]))
    theta = 0.75  # alpha = 0.75 / 0.5 = 1.5
    torch.testing.assert_close(relevance_weights(text, theta=theta), torch.exp(1.5 * relevance_weights(text)))
    per_image = relevance_weights(torch.tensor([[0.0, 1.0], [0.0, 3.0]]))  # each image normalised on its own
    torch.testing.assert_close(per_image, torch.tensor([[1 + 1e-6, 1e-6], [1 + 1e-6 / 3, 1e-6 / 3]]))


def test_duplicate_tokens_are_not_picked_twice():
    sig = small_signals(seed=5, n=12, d=4)  # rank 4 < 9 picks: the kernel runs out
    sig.projected[0, 7] = sig.projected[0, 2]
    sig.text_sim[0, 7] = sig.text_sim[0, 2]
    for k in (4, 9, 11):
        [sel] = get("cdpruner").select(sig, k)
        assert sel.kept_indices().unique().numel() == k == sel.num_tokens


# ----------------------------------------------------------------------------- options, budgets, provenance


@pytest.mark.parametrize("bad", [{"relevance": "inverse"}, {"theta": 1.0}, {"theta": -0.1}, {"theta": "0.5"}, {"theta": True},
                                 {"space": "pixels"}])
def test_bad_options_are_named(bad):
    with pytest.raises(VTCError, match=f"cdpruner: {next(iter(bad))}"):
        get("cdpruner", **bad)


def test_auto_and_missing_signals_are_refused():
    sig = small_signals()
    with pytest.raises(VTCError, match="no dynamic rule"):
        get("cdpruner").select(sig, "auto")
    with pytest.raises(VTCError, match="text_sim"):
        get("cdpruner").select(Signals(features=sig.features, grid=sig.grid, projected=sig.projected), 3)
    with pytest.raises(VTCError, match="more than"):
        get("cdpruner").select(sig, 13)


@pytest.mark.parametrize("budget", [1, 5, 0.25, 0.5, 12])
def test_budgets_are_exact_and_every_kept_token_is_its_patch(budget):
    sig = small_signals(seed=6, batch=3)
    for b, sel in enumerate(get("cdpruner").select(sig, budget)):
        k = Budget.parse(budget).tokens(12)
        assert sel.num_tokens == k and sel.counts()["kept"] == k
        kept = sel.kept_indices()
        assert kept.tolist() == sorted(kept.tolist())
        torch.testing.assert_close(sel.tokens, sig.features[b, kept])
        assert sel.owner[kept].tolist() == list(range(k)) and int((sel.owner >= 0).sum()) == k


def test_features_space_reads_no_projector_output():
    sig = small_signals(seed=7)
    method = get("cdpruner", space="features")
    assert Signal.PROJECTED not in method.needs
    [sel] = method.select(Signals(features=sig.features, grid=sig.grid, text_sim=sig.text_sim), 4)
    expected = naive_cdpruner(sig.features[0].tolist(), sig.text_sim[0].tolist(), 4)
    assert sel.kept_indices().tolist() == sorted(expected)


# ----------------------------------------------------------------------------- the adapter's text reading


def test_adapter_scores_the_feature_layer_and_stops_there(tiny_pipe):
    """CDPruner's TextSpec makes the adapter score the feature layer's patch states (CLIP's vision tower run
    only that deep); the default spec scores the final layer's."""
    adapter, scorer = tiny_pipe.adapter, tiny_pipe.adapter.text_scorer
    pixels = tiny_pipe.prepare([random_image(i) for i in range(2)], QUESTIONS[:2])["pixel_values"]
    with torch.no_grad():
        hidden = adapter.tower(pixels, output_hidden_states=True).hidden_states
    calls = []
    handle = adapter.tower.encoder.layers[-1].register_forward_hook(lambda *args: calls.append(1))
    try:
        needs = get("cdpruner").needs
        sig = adapter.signals(pixels, needs, AttentionSpec(), QUESTIONS[:2], text=get("cdpruner").text)
        assert calls == []
        torch.testing.assert_close(sig.text_sim, scorer.similarity(hidden[-2][:, 1:], QUESTIONS[:2], TEXT))
        default = adapter.signals(pixels, needs, AttentionSpec(), QUESTIONS[:2], text=TextSpec())
        assert calls == [1]
        torch.testing.assert_close(default.text_sim, scorer.similarity(hidden[-1][:, 1:], QUESTIONS[:2], TextSpec()))
    finally:
        handle.remove()
    assert not torch.allclose(sig.text_sim, default.text_sim)


def test_segments_equal_truncation_within_the_context_and_refuse_other_readings(tiny_pipe):
    scorer = tiny_pipe.adapter.text_scorer
    states = torch.randn(2, 16, scorer.post_layernorm.weight.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scorer.similarity(states, QUESTIONS[:2], TEXT),
                               scorer.similarity(states, QUESTIONS[:2], TextSpec(patch_states="feature")))
    for spec in (TextSpec(segments=True, pooling="last"), TextSpec(segments=True, max_length=8)):
        with pytest.raises(VTCError, match="segments"):
            scorer.similarity(states, QUESTIONS[:2], spec)


@pytest.mark.parametrize("name", ["cdpruner", "cdpruner+text"])
def test_runs_end_to_end_and_a_batch_equals_single_images(tiny_pipe, name):
    images = [random_image(i) for i in range(3)]
    batch = tiny_pipe(images, QUESTIONS, method=name, budget=0.3, max_new_tokens=2)
    singles = [tiny_pipe([im], [q], method=name, budget=0.3, max_new_tokens=2)[0] for im, q in zip(images, QUESTIONS)]
    for r, s in zip(batch, singles):
        assert r.tokens_after == s.tokens_after == Budget.parse(0.3).tokens(r.tokens_before)
        assert r.selection.kept_indices().tolist() == s.selection.kept_indices().tolist()
