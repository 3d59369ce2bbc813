"""The LLM-embedding text score: cosine(question tokens in the LM's input table, projected image tokens)."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vtc.cli import app
from vtc.methods import AttentionSpec, Signal, TextSpec, VTCError
from vtc.methods.recoverable import PUBLISHED_TEXT
from vtc.models.embed_text import EmbeddingTextScorer
from vtc.testing import word_tokenizer

from conftest import random_image

# Each question with the words each pooling must read, written out by hand (the tiny tokenizer is word-level,
# punctuation isolated): "?" / "." are tokens without a letter or digit, so max_content leaves them out.
CASES = [
    ("what is the color of the circle ?", ["what", "is", "the", "color", "of", "the", "circle", "?"]),
    ("red square", ["red", "square"]),
    ("how many blue triangle in the picture ?", ["how", "many", "blue", "triangle", "in", "the", "picture", "?"]),
]
PUNCTUATION = {"?", ".", ",", ":"}


@pytest.fixture(scope="module")
def llm_pipe(tiny_dirs):
    from vtc.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_dirs[0], text_source="llm")


@pytest.fixture(scope="module")
def table(llm_pipe):
    return llm_pipe.model.get_input_embeddings()


def scorer_for(llm_pipe, pooling, tokenizer=None):
    return EmbeddingTextScorer.from_model(llm_pipe.model, tokenizer or llm_pipe.processor.tokenizer, pooling)


def naive_scores(table, tokenizer, words: list[str], patches: torch.Tensor, pooling: str) -> torch.Tensor:
    """One image: a loop over patches and over the words, cosine written out."""
    if pooling in ("max_content", "max_centred"):
        words = [w for w in words if w not in PUNCTUATION]
    vectors = [table.weight[tokenizer.convert_tokens_to_ids(w)].detach().double() for w in words]
    patches = patches.double()

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    # max_centred: each word's average cosine over all patches of the image, subtracted
    level = [sum(cos(v, p) for p in patches) / len(patches) if pooling == "max_centred" else 0.0 for v in vectors]
    out = torch.empty(patches.shape[0], dtype=torch.float64)
    for n, patch in enumerate(patches):
        if pooling == "mean":
            out[n] = cos(sum(vectors) / len(vectors), patch)
        else:
            out[n] = max(cos(v, patch) - lv for v, lv in zip(vectors, level))
    return out


def random_projected(batch: int, n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pooling", ["mean", "max", "max_content", "max_centred"])
def test_similarity_matches_a_naive_loop(llm_pipe, table, pooling):
    scorer = scorer_for(llm_pipe, pooling)
    projected = random_projected(len(CASES), 16, scorer.width)
    got = scorer.similarity(projected, [q for q, _ in CASES])
    assert got.shape == (len(CASES), 16)
    for b, (_, words) in enumerate(CASES):
        expected = naive_scores(table, llm_pipe.processor.tokenizer, words, projected[b], pooling)
        torch.testing.assert_close(got[b].double(), expected, atol=1e-5, rtol=1e-5)


def test_the_poolings_differ(llm_pipe):
    """Guards the naive loop's inputs: on these questions each pooling gives a different score."""
    projected = random_projected(len(CASES), 16, scorer_for(llm_pipe, "max").width)
    poolings = ("mean", "max", "max_content", "max_centred")
    scores = [scorer_for(llm_pipe, p).similarity(projected, [q for q, _ in CASES]) for p in poolings]
    assert all(not torch.allclose(a, b) for a, b in zip(scores, scores[1:]))


@pytest.mark.parametrize("pooling", ["mean", "max", "max_content", "max_centred"])
def test_padded_batch_equals_single_runs(llm_pipe, pooling):
    # a table with no zero padding row (the tiny LLaMA's row 0 is zero, which would hide a padding leak)
    torch.manual_seed(0)
    table = torch.nn.Embedding(len(llm_pipe.processor.tokenizer), 48)
    scorer = EmbeddingTextScorer(table, llm_pipe.processor.tokenizer, pooling)
    questions = ["circle ?", "what is the color of the small red circle left of the square ?", "yes"]
    projected = random_projected(3, 16, scorer.width, seed=1)
    batch = scorer.similarity(projected, questions)
    for b, q in enumerate(questions):
        torch.testing.assert_close(batch[b : b + 1], scorer.similarity(projected[b : b + 1], [q]), atol=1e-6, rtol=1e-6)


def bos_tokenizer():
    """The tiny tokenizer, but adding <s> in front of every text as LLaMA's tokenizer does."""
    from tokenizers import processors

    tokenizer = word_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer("red").input_ids[0] == bos  # the plant is in place
    return tokenizer


@pytest.mark.parametrize("pooling", ["mean", "max", "max_centred"])
def test_special_tokens_never_count(llm_pipe, table, pooling):
    tokenizer = bos_tokenizer()
    scorer = scorer_for(llm_pipe, pooling, tokenizer)
    projected = random_projected(2, 16, scorer.width, seed=2)
    # BOS added by the tokenizer, special-token strings inside the text (as the prompt-first-line query has),
    # and an out-of-vocabulary word ("zebra": the tokenizer's <unk>, a special token too)
    got = scorer.similarity(projected, ["red circle ?", "<s> what zebra color </s> <image>"])
    torch.testing.assert_close(got[0].double(), naive_scores(table, tokenizer, ["red", "circle", "?"], projected[0], pooling), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].double(), naive_scores(table, tokenizer, ["what", "color"], projected[1], pooling), atol=1e-5, rtol=1e-5)


def test_only_punctuation_falls_back_to_every_non_special_token(llm_pipe, table):
    scorer = scorer_for(llm_pipe, "max_content")
    projected = random_projected(1, 16, scorer.width, seed=3)
    got = scorer.similarity(projected, ["? ."])
    torch.testing.assert_close(got[0].double(), naive_scores(table, llm_pipe.processor.tokenizer, ["?", "."], projected[0], "max"), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the adapter and the pipeline


def test_adapter_scores_the_projected_patch_tokens_without_running_the_tower_deeper(llm_pipe, images, monkeypatch):
    adapter = llm_pipe.adapter
    questions = [q for q, _ in CASES]
    pixels = llm_pipe.prepare(images, questions)["pixel_values"]
    received = {}
    real = EmbeddingTextScorer.similarity

    def recording(self, projected, queries, spec=TextSpec()):
        received["projected"] = projected
        return real(self, projected, queries, spec)

    monkeypatch.setattr(EmbeddingTextScorer, "similarity", recording)
    last = adapter.tower.encoder.layers[-1]
    calls = []
    hook = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        sig = adapter.signals(pixels, frozenset({Signal.FEATURES, Signal.TEXT_SIM}), AttentionSpec(), questions)
    finally:
        hook.remove()
    assert calls == [], "the LLM text score reads the feature layer: the tower's last layer must not run"
    with torch.no_grad():  # by hand: LLaVA's feature layer (-2), CLS dropped, through the projector
        states = llm_pipe.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = llm_pipe.model.model.multi_modal_projector(states)
    torch.testing.assert_close(received["projected"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sig.text_sim, real(adapter.text_scorer, expected, questions), atol=1e-5, rtol=1e-5)


def test_clip_scorer_still_reads_the_final_states(tiny_pipe, images):
    from vtc.models.clip_text import ClipTextScorer

    assert ClipTextScorer.reads == "final" and EmbeddingTextScorer.reads == "projected"
    last = tiny_pipe.adapter.tower.encoder.layers[-1]
    calls = []
    hook = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_pipe.adapter.signals(tiny_pipe.prepare(images[:1], ["red ?"])["pixel_values"], frozenset({Signal.FEATURES, Signal.TEXT_SIM}), AttentionSpec(), ["red ?"])
    finally:
        hook.remove()
    assert calls == [1]


@pytest.mark.parametrize("method", ["recoverable", "fastervlm+text"])
def test_pipeline_runs_text_guided_methods_with_the_llm_source(llm_pipe, method):
    assert isinstance(llm_pipe.adapter.text_scorer, EmbeddingTextScorer) and llm_pipe.adapter.text_scorer.pooling == "max_centred"
    imgs = [random_image(20 + i, size=(36 + 5 * i, 44)) for i in range(3)]
    questions = [q for q, _ in CASES]
    batch = llm_pipe(imgs, questions, method=method, budget=4, max_new_tokens=3)
    assert [r.tokens_after for r in batch] == [4, 4, 4]
    singles = [llm_pipe([img], [q], method=method, budget=4, max_new_tokens=3)[0] for img, q in zip(imgs, questions)]
    assert [r.text for r in batch] == [r.text for r in singles]
    assert [r.selection.counts() for r in batch] == [r.selection.counts() for r in singles]


def test_cli_run_with_the_llm_source(tiny_dirs, tmp_path):
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "red.png")
    args = ["run", "--model", str(tiny_dirs[0]), "--text-source", "llm", "--image", str(tmp_path / "red.png"),
            "--question", "what is the color ?", "--method", "recoverable", "--budget", "4", "--json", "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["tokens_after"] == 4
    both = CliRunner().invoke(app, args + ["--clip", str(tiny_dirs[1])])
    output = " ".join(both.output.split())  # rich wraps long lines
    assert both.exit_code == 2 and "give no CLIP checkpoint" in output and "Traceback" not in output


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(llm_pipe, tiny_dirs):
    from vtc.pipeline import Pipeline

    scorer = scorer_for(llm_pipe, "max_content")
    good = random_projected(2, 16, scorer.width)
    with pytest.raises(VTCError, match="width 32 but the language model's input embeddings have width 48"):
        scorer.similarity(random_projected(2, 16, 32), ["red", "blue"])
    with pytest.raises(VTCError, match="2 images but 3 text queries"):
        scorer.similarity(good, ["red", "blue", "green"])
    with pytest.raises(VTCError, match="2 images but a string"):
        scorer.similarity(good, "red")
    with pytest.raises(VTCError, match=r"must be \(B, N, D\)"):
        scorer.similarity(good[0], ["red"])
    with pytest.raises(VTCError, match="query 1 .* no token besides special tokens"):
        scorer.similarity(good, ["red", "<s> </s>"])
    with pytest.raises(VTCError, match="pooling='last'.*max_length=20.*post_layernorm=False.*scaled=True"):
        scorer.similarity(good, ["red", "blue"], PUBLISHED_TEXT)
    with pytest.raises(VTCError, match="text pooling must be one of mean, max, max_content, max_centred"):
        scorer_for(llm_pipe, "eos")
    with pytest.raises(VTCError, match="give no CLIP checkpoint"):
        Pipeline.from_pretrained(tiny_dirs[0], clip=tiny_dirs[1], text_source="llm")
    with pytest.raises(VTCError, match="text_source must be 'clip' or 'llm', got 'bert'"):
        Pipeline.from_pretrained(tiny_dirs[0], text_source="bert")
    with pytest.raises(VTCError, match="cannot honour pooling='last'"):  # the published CLIP reading is refused
        llm_pipe([random_image(0)], ["red ?"], method="recoverable", budget=4, compat="original")
