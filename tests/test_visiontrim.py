"""VisionTrim: parity with the official code (fixtures), a naive loop over the official steps, edge cases, signals."""

from pathlib import Path

import pytest
import torch

from vtc.methods import AttentionSpec, Budget, Origin, Signal, Signals, TextSpec, VTCError, get
from vtc.methods.visiontrim import split_budget
from vtc.models.clip_text import per_token_scores

FIXTURES = Path(__file__).parent / "fixtures" / "visiontrim" / "cases.pt"


@pytest.fixture(scope="module")
def fixtures():
    return torch.load(FIXTURES, weights_only=False)


def text_signal(features, text_states, visual_projection, text_projection):
    """TEXT_SIM per token as the CLIP scorer builds it: projected patches, unit projected text tokens."""
    tokens = torch.nn.functional.normalize(text_states @ text_projection.T, dim=-1)
    return per_token_scores(features @ visual_projection.T, tokens)


def fixture_signals(case_input) -> Signals:
    features = case_input["hidden"][:, 1:]
    n = features.shape[1]
    side = int(n**0.5)
    return Signals(
        features=features, grid=(side, side), cls_attn=case_input["cls_attn"],
        received_attn=case_input["received_others"],
        text_sim=text_signal(features, case_input["text_states"], case_input["visual_projection"], case_input["text_projection"]),
    )


def method_for(dominant: int, complement: int):
    """A complement_ratio whose int(T * ratio) is exactly ``complement`` of T = dominant + complement."""
    total = dominant + complement
    return get("visiontrim", complement_ratio=(complement + 0.5) / total), total


def test_matches_the_official_code(fixtures):
    worst = 0.0
    for case in fixtures["cases"]:
        source = fixtures["inputs"][case["input"]]
        signals = fixture_signals(source)
        method, total = method_for(case["dominant"], case["complement"])
        n = signals.num_patches
        for b, sel in enumerate(method.select(signals, total)):
            kept = case["kept"][b].sort().values  # the official top-k picks, raster order as the code sorts them
            assert sel.num_tokens == total
            assert sel.kept_indices().tolist() == kept.tolist()  # count and raster order
            others = torch.tensor([i for i in range(n) if i not in set(kept.tolist())])
            anchors = [int(s[0]) if len(s) == 1 else None for s in sel.sources[case["dominant"]:]]
            targets = others[case["target_positions"][b].sort().values]
            owners = sel.owner[targets]  # every target owns itself, complement tokens in target order
            assert owners.tolist() == list(range(case["dominant"], total)), case
            assert all(a is None or a == t for a, t in zip(anchors, targets.tolist()))
            merged = sel.tokens[case["dominant"]:]
            torch.testing.assert_close(merged, case["complement_rows"][b], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(sel.tokens[: case["dominant"]].sum(0), case["dominant_rows_sum"][b], atol=1e-4, rtol=1e-4)
            worst = max(worst, float((merged - case["complement_rows"][b]).abs().max()))
    assert worst < 1e-4


# ----------------------------------------------------------------------------- a naive loop over the official steps


def naive_visiontrim(x, g, l, v, tokens, dominant, complement, rounds=3, alpha=0.5):
    """One image as Python loops: (dominant indices, [(target, value, sources)])."""
    n = len(x)
    norm = lambda s: sum(float(t) ** 2 for t in s) ** 0.5  # noqa: E731
    gn, ln = norm(g), norm(l)
    score = [alpha * float(g[i]) / gn + (1 - alpha) * float(l[i]) / ln for i in range(n)]
    order = sorted(range(n), key=lambda i: (-score[i], i))
    kept = sorted(order[:dominant])
    others = [i for i in range(n) if i not in kept]

    def cos(a, b):
        na, nb = float(a.norm()), float(b.norm())
        return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)

    relevance = {i: sum(cos(v[i], t) for t in tokens) / len(tokens) for i in others}
    targets = sorted(sorted(others, key=lambda i: (-relevance[i], i))[:complement])
    rest = [i for i in others if i not in targets]
    value = {t: x[t].clone() for t in targets}
    vec = {t: v[t].clone() for t in targets}
    sources = {t: {t} for t in targets}
    for _ in range(rounds):
        groups = {t: [] for t in targets}
        for h in rest:
            metric = [sum(cos(v[h], tok) * cos(tok, vec[t]) for tok in tokens) for t in targets]
            groups[targets[max(range(len(targets)), key=lambda k: (metric[k], -k))]].append(h)
        for t, members in groups.items():
            if members:
                value[t] = value[t] + torch.stack([x[h] for h in members]).mean(0)
                vec[t] = vec[t] + torch.stack([v[h] for h in members]).mean(0)
                sources[t] |= set(members)
    return kept, [(t, value[t], sorted(sources[t])) for t in targets]


def random_signals(seed=0, batch=2, n=25, d=6, p=5, m=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    v = x @ torch.randn(p, d, generator=gen, dtype=torch.float64).T  # a linear visual projection
    tokens = torch.nn.functional.normalize(torch.randn(batch, m, p, generator=gen, dtype=torch.float64), dim=-1)
    sig = Signals(features=x, grid=(5, 5), cls_attn=torch.rand(batch, n, generator=gen, dtype=torch.float64),
                  received_attn=torch.rand(batch, n, generator=gen, dtype=torch.float64), text_sim=per_token_scores(v, tokens))
    return sig, v, tokens


@pytest.mark.parametrize("seed,budget,ratio", [(0, 8, 0.25), (1, 12, 0.5), (2, 5, 0.4), (3, 25, 0.2), (4, 4, 1.0)])
def test_matches_a_naive_loop(seed, budget, ratio):
    sig, v, tokens = random_signals(seed)
    dominant, complement = split_budget(budget, ratio)
    for b, sel in enumerate(get("visiontrim", complement_ratio=ratio).select(sig, budget)):
        kept, merged = naive_visiontrim(sig.features[b], sig.cls_attn[b], sig.received_attn[b], v[b].float(), tokens[b].float(),
                                        dominant, complement)
        assert sel.kept_indices().tolist() == kept
        assert sel.counts()["merged"] == complement == len(merged)
        for j, (target, value, sources) in enumerate(merged):
            token = dominant + j
            assert sel.owner[target] == token
            assert sorted(sel.sources[token].tolist()) == sources
            torch.testing.assert_close(sel.tokens[token], value, atol=1e-5, rtol=1e-5)


def test_split_rounds_down_the_complement():
    assert split_budget(64, 0.25) == (48, 16)  # the official defaults
    assert split_budget(7, 0.25) == (6, 1) and split_budget(3, 0.25) == (3, 0) and split_budget(10, 1.0) == (0, 10)


# ----------------------------------------------------------------------------- edge cases


def test_budget_one_and_budget_n():
    sig, _, _ = random_signals(5)
    [one, _] = get("visiontrim").select(sig, 1)  # int(0.25) = 0 complement: the top DVTS patch
    score = 0.5 * sig.cls_attn[0] / sig.cls_attn[0].norm() + 0.5 * sig.received_attn[0] / sig.received_attn[0].norm()
    assert one.kept_indices().tolist() == [int(score.argmax())] and one.counts()["merged"] == 0
    for b, sel in enumerate(get("visiontrim").select(sig, 25)):  # nothing left to merge: targets stay plain patches
        assert sel.num_tokens == 25 and sel.counts()["merged"] == 6
        assert sorted(torch.cat(sel.sources).tolist()) == list(range(25))  # every patch once
        torch.testing.assert_close(sel.tokens, sig.features[b, torch.cat(sel.sources)])


def test_equal_scores_take_the_lower_index_first():
    sig, _, _ = random_signals(6)
    sig.cls_attn = torch.ones_like(sig.cls_attn)
    sig.received_attn = torch.ones_like(sig.received_attn)
    sig.text_sim = torch.zeros_like(sig.text_sim)  # no text: every relevance and every metric 0
    for sel in get("visiontrim").select(sig, 8):
        assert sel.kept_indices().tolist() == [0, 1, 2, 3, 4, 5]
        assert sel.owner[6] == 6 and sel.owner[7] == 7  # the first two others are the targets
        assert sorted(sel.sources[6].tolist()) == [6] + list(range(8, 25))  # all rest to the first target
        assert sel.sources[7].tolist() == [7]


def test_complement_ratio_zero_needs_no_text_and_ratio_budgets_are_exact():
    method = get("visiontrim", complement_ratio=0)
    assert Signal.TEXT_SIM not in method.needs and Signal.TEXT_SIM in get("visiontrim").needs
    sig, _, _ = random_signals(7)
    sig.text_sim = None
    assert [s.num_tokens for s in method.select(sig, 0.3)] == [Budget.parse(0.3).tokens(25)] * 2


@pytest.mark.parametrize("options,message", [
    ({"complement_ratio": 1.5}, "complement_ratio"), ({"complement_ratio": "a"}, "complement_ratio"),
    ({"rounds": 0}, "rounds"), ({"rounds": 2.0}, "rounds"), ({"alpha": -0.1}, "alpha"), ({"alpha": True}, "alpha"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(VTCError, match=message):
        get("visiontrim", **options)


def test_a_pooled_text_score_is_refused_clearly():
    sig, _, _ = random_signals(8)
    sig.text_sim = torch.rand(2, 25)
    with pytest.raises(VTCError, match="per text token"):
        get("visiontrim").select(sig, 8)


def test_auto_is_refused():
    sig, _, _ = random_signals(9)
    with pytest.raises(VTCError, match="no dynamic rule"):
        get("visiontrim").select(sig, "auto")


def test_declares_the_official_reading():
    method = get("visiontrim")
    assert method.attention == AttentionSpec(layer=-2, heads="mean", received="others")
    assert method.text == TextSpec(per_token=True, patch_states="feature", post_layernorm=False)


# ----------------------------------------------------------------------------- the signals it reads


QUESTIONS = ["what color is the small circle ?", "is there a red square ?"]


def test_received_attention_without_the_diagonal_matches_eager(tiny_pipe, tiny_dirs):
    from transformers import LlavaForConditionalGeneration

    from conftest import random_image

    eager = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0], attn_implementation="eager").eval()
    pixels = tiny_pipe.prepare([random_image(i) for i in range(2)], QUESTIONS)["pixel_values"]
    sig = tiny_pipe.adapter.signals(pixels, frozenset({Signal.FEATURES, Signal.RECEIVED_ATTN}), get("visiontrim").attention)
    with torch.no_grad():
        attention = eager.model.vision_tower(pixels, output_attentions=True).attentions[-2].mean(1)  # B, 1+N, 1+N
    patches = attention[:, 1:, 1:]
    n = patches.shape[-1]
    expected = torch.stack([torch.stack([sum(patches[b, i, j] for i in range(n) if i != j) / (n - 1) for j in range(n)])
                            for b in range(2)])
    torch.testing.assert_close(sig.received_attn, expected, atol=1e-5, rtol=1e-5)


def test_clip_per_token_text_score_is_the_official_reading(tiny_pipe, tiny_dirs):
    """[..., 0, :] = visual_projection of the feature-layer states (no post_layernorm); [..., 1, :M] = their dots
    with every question token's final state through text_projection, unit length; zero beyond."""
    from transformers import AutoTokenizer, CLIPModel

    from conftest import random_image

    clip = CLIPModel.from_pretrained(tiny_dirs[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[1])
    pixels = tiny_pipe.prepare([random_image(i) for i in range(2)], QUESTIONS)["pixel_values"]
    method = get("visiontrim")
    sig = tiny_pipe.adapter.signals(pixels, method.needs, method.attention, QUESTIONS, text=method.text)
    for b, question in enumerate(QUESTIONS):
        with torch.no_grad():
            states = clip.text_model(**tokenizer([question], return_tensors="pt")).last_hidden_state[0]
            tokens = torch.nn.functional.normalize(clip.text_projection(states), dim=-1)  # M, P
            vectors = clip.visual_projection(sig.features[b])  # N, P
        m, p = tokens.shape[0], vectors.shape[1]
        torch.testing.assert_close(sig.text_sim[b, :, 0, :p], vectors, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sig.text_sim[b, :, 1, :m], vectors @ tokens.T, atol=1e-5, rtol=1e-5)
        assert not sig.text_sim[b, :, 0, p:].any() and not sig.text_sim[b, :, 1, m:].any()


def test_llm_per_token_text_score_reads_the_projected_tokens(tiny_dirs):
    from vtc.models.embed_text import EmbeddingTextScorer
    from vtc.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_dirs[0], text_source="llm")
    table = pipe.model.get_input_embeddings().weight.detach().clone()
    table[0] = 1.0  # the id padding a shorter question: a nonzero row here, so the padding must be masked
    scorer = EmbeddingTextScorer(torch.nn.Embedding.from_pretrained(table), pipe.processor.tokenizer)
    projected = torch.randn(2, 9, scorer.width, generator=torch.Generator().manual_seed(0))
    got = scorer.similarity(projected, ["red square ?", "what is the color"], get("visiontrim").text)
    for b, words in enumerate([["red", "square"], ["what", "is", "the", "color"]]):  # max_centred counts no "?"
        ids = pipe.processor.tokenizer.convert_tokens_to_ids(words)
        unit = torch.nn.functional.normalize(table[ids], dim=-1)
        torch.testing.assert_close(got[b, :, 0, : scorer.width], projected[b])
        torch.testing.assert_close(got[b, :, 1, : len(ids)], projected[b] @ unit.T, atol=1e-5, rtol=1e-5)
        assert not got[b, :, 1, len(ids):].any()


def test_runs_end_to_end_and_composes_only_without_tgvc(tiny_pipe):
    from conftest import random_image

    images = [random_image(i) for i in range(2)]
    for r in tiny_pipe(images, QUESTIONS, method="visiontrim", budget=8, max_new_tokens=2):
        assert r.tokens_after == 8 and r.selection.counts()["kept"] == 6 and r.selection.counts()["merged"] == 2
    for r in tiny_pipe(images, QUESTIONS, method="visiontrim+text", budget=8, max_new_tokens=2, complement_ratio=0):
        assert r.tokens_after == 8 and r.selection.counts()["merged"] == 0
    with pytest.raises(VTCError, match="text-guided itself"):
        get("visiontrim+text")


def test_speed_gives_it_the_per_token_text_form():
    from vtc.cost import Shape
    from vtc.speed import random_signals

    shape = Shape(vision_width=32, vision_mlp=64, vision_layers=2, patch_size=14, image_size=112, llm_width=48,
                  llm_mlp=96, llm_layers=2, heads=4, kv_heads=4, vocab=100)
    sig = random_signals(get("visiontrim"), shape, batch=2)
    assert sig.text_sim.shape == (2, 64, 2, 768)
    assert [s.num_tokens for s in get("visiontrim").select(sig, 16)] == [16, 16]
    no_cls = random_signals(get("visiontrim"), Shape(**{**shape.__dict__, "cls_tokens": 0}), batch=1)
    assert no_cls.text_sim.shape == (1, 64, 2, 48)  # no CLS: only the LLM-embedding source, LLM-wide


def test_alpha_one_ranks_by_cls_attention_alone_and_info_gives_the_split():
    sig, _, _ = random_signals(10)
    method = get("visiontrim", alpha=1, rounds=1)  # one round is a valid choice
    for b, sel in enumerate(method.select(sig, 8)):
        assert sel.kept_indices().tolist() == sorted(sig.cls_attn[b].argsort(descending=True)[:6].tolist())
        assert sel.info == {"dominant": 6, "complement": 2}
