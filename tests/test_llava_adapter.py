"""The LLaVA adapter on a tiny random checkpoint saved and loaded back with from_pretrained."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vtc.methods import AttentionSpec, Budget, Method, Selection, Signal, VTCError, get
from vtc.models.llava import LlavaAdapter

from conftest import random_image

QUESTIONS = ["what is the color of the circle ?", "how many red square ?", "is there a triangle left ?"]


@pytest.fixture(scope="module")
def eager_model(tiny_dirs):
    return LlavaForConditionalGeneration.from_pretrained(tiny_dirs[0], attn_implementation="eager").eval()


@pytest.mark.parametrize("layer", [-1, -2, 0])
@pytest.mark.parametrize("heads", ["mean", "sum", "single"])
def test_cls_row_and_keys_match_eager_attention(tiny_pipe, eager_model, images, layer, heads):
    pixels = tiny_pipe.prepare(images, QUESTIONS)["pixel_values"]
    spec = AttentionSpec(layer=layer, heads=heads, keys="head_mean")
    sig = tiny_pipe.adapter.signals(pixels, frozenset({Signal.FEATURES, Signal.CLS_ATTN, Signal.KEYS}), spec)

    tower = eager_model.model.vision_tower
    captured = {}
    layer_mod = tower.encoder.layers[layer]
    hook = layer_mod.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    hook_q = layer_mod.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.setdefault("q", o))
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
    hook.remove(), hook_q.remove()
    heads_n = tower.config.num_attention_heads
    b, t, d = captured["k"].shape
    if heads == "single":  # one head over the full width, written out as the full matrix
        full = torch.softmax(captured["q"] @ captured["k"].transpose(1, 2) / d**0.5, dim=-1)
        expected = full[:, 0, 1:]
    else:
        probs = out.attentions[layer][:, :, 0, 1:]  # eager attention probabilities of that layer
        expected = probs.mean(1) if heads == "mean" else probs.sum(1)
    torch.testing.assert_close(sig.cls_attn, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sig.keys, captured["k"][:, 1:].reshape(b, t - 1, heads_n, -1).mean(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sig.features, out.hidden_states[-2][:, 1:], atol=1e-5, rtol=1e-5)


def test_text_similarity_is_cosine_with_projected_final_states(tiny_pipe, tiny_dirs, images):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_dirs[1]).eval()
    inputs = tiny_pipe.prepare(images, QUESTIONS)
    sig = tiny_pipe.adapter.signals(inputs["pixel_values"], frozenset({Signal.FEATURES, Signal.TEXT_SIM}), AttentionSpec(), QUESTIONS)
    with torch.no_grad():
        final = tiny_pipe.model.model.vision_tower(inputs["pixel_values"]).last_hidden_state[:, 1:]
        patches = clip.visual_projection(clip.vision_model.post_layernorm(final))
        tok = tiny_pipe.adapter.text_scorer.tokenizer(QUESTIONS, padding=True, return_tensors="pt")
        text = clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        text = text.pooler_output if hasattr(text, "pooler_output") else text
    expected = torch.nn.functional.cosine_similarity(patches, text[:, None, :], dim=-1)
    torch.testing.assert_close(sig.text_sim, expected, atol=1e-5, rtol=1e-5)


def test_none_is_token_for_token_identical_to_stock_generate(tiny_pipe):
    for seed in range(3):
        inputs = tiny_pipe.prepare([random_image(seed + 10)], [QUESTIONS[seed]])
        stock = tiny_pipe.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tiny_pipe.pad_token_id)
        stock_text = tiny_pipe.processor.tokenizer.decode(stock[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        [ours] = tiny_pipe.generate(inputs, [QUESTIONS[seed]], "none", "auto", max_new_tokens=8)
        assert ours.text == stock_text.strip()
        assert ours.tokens_after == ours.tokens_before == 16


def test_stock_forward_logits_match_with_spliced_tokens(tiny_pipe):
    """With method none, our splice yields the same logits as stock forward with pixel_values."""
    inputs = tiny_pipe.prepare([random_image(3)], [QUESTIONS[0]])
    method = get("none")
    sels, _ = tiny_pipe.compress(inputs, [QUESTIONS[0]], method, Budget.parse("auto"))
    projected = tiny_pipe.adapter.project(sels)
    ids, mask = tiny_pipe.adapter.splice_ids(inputs["input_ids"], inputs["attention_mask"], [16], tiny_pipe.pad_token_id)
    with torch.no_grad():
        ours = tiny_pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=tiny_pipe.adapter.image_inputs(projected)).logits
        stock = tiny_pipe.model(**inputs).logits
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)


class KeepAboveMean(Method):
    """Test method: keeps the patches with above-mean CLS attention, so K depends on the image."""

    name = "above-mean"
    needs = frozenset({Signal.FEATURES, Signal.CLS_ATTN})
    supports_auto = True

    def select_one(self, signals, budget):
        attn = signals.cls_attn[0]
        return Selection.build(signals.features[0], (attn > attn.mean()).nonzero().squeeze(1))


@pytest.mark.parametrize(
    "method,budget", [(KeepAboveMean(), "auto"), ("recoverable", "auto"), ("prumerge", "auto"), ("pool", 5)]
)
def test_batch_with_different_k_matches_single_runs(tiny_pipe, method, budget):
    images = [random_image(i, size=(30 + 7 * i, 60 - 9 * i)) for i in range(4)]
    questions = QUESTIONS + ["describe the picture ."]
    batch = tiny_pipe(images, questions, method=method, budget=budget, max_new_tokens=6)
    singles = [tiny_pipe([img], [q], method=method, budget=budget, max_new_tokens=6)[0] for img, q in zip(images, questions)]
    assert [r.tokens_after for r in batch] == [r.tokens_after for r in singles]
    if isinstance(method, KeepAboveMean):
        assert len({r.tokens_after for r in batch}) > 1, "the batch should mix different K"
    assert [r.text for r in batch] == [r.text for r in singles]


def test_kv_cache_holds_k_image_tokens(tiny_pipe, images):
    inputs = tiny_pipe.prepare(images[:1], QUESTIONS[:1])
    sels, _ = tiny_pipe.compress(inputs, QUESTIONS[:1], get("pool"), Budget.parse(4))
    ids, mask = tiny_pipe.adapter.splice_ids(inputs["input_ids"], inputs["attention_mask"], [4], tiny_pipe.pad_token_id)
    with torch.no_grad():
        out = tiny_pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=tiny_pipe.adapter.image_inputs(tiny_pipe.adapter.project(sels)), use_cache=True)
    assert out.cache.get_seq_length() == inputs["input_ids"].shape[1] - 16 + 4


def test_text_method_without_clip_fails_clearly(tiny_dirs, images):
    from vtc.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(tiny_dirs[0])
    with pytest.raises(VTCError, match="--clip"):
        pipe(images[:1], QUESTIONS[:1], method="recoverable")
    assert pipe(images[:1], QUESTIONS[:1], method="prumerge", max_new_tokens=2)[0].tokens_after >= 2


def test_unsupported_models_are_refused(tiny_dirs, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vtc.pipeline import Pipeline

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(VTCError, match="LlamaForCausalLM is not supported"):
        LlavaAdapter(llama)
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(VTCError, match="type 'llama'"):
        Pipeline.from_pretrained(tmp_path / "llama")
    with pytest.raises(VTCError, match="not a directory"):
        Pipeline.from_pretrained(tmp_path / "missing")


def test_splice_refuses_prompts_without_the_image(tiny_pipe, images):
    inputs = tiny_pipe.prepare(images[:1], QUESTIONS[:1])
    ids = inputs["input_ids"].clone()
    ids[ids == tiny_pipe.adapter.image_token_id] = 5
    with pytest.raises(VTCError, match="0 image placeholder tokens"):
        tiny_pipe.adapter.splice_ids(ids, inputs["attention_mask"], [4], 0)


def test_bad_questions_and_counts(tiny_pipe, images):
    with pytest.raises(VTCError, match="question 0 is empty"):
        tiny_pipe(images[:1], ["   "], method="random", budget=4)
    with pytest.raises(VTCError, match="one question per image"):
        tiny_pipe(images[:2], QUESTIONS[:1], method="random", budget=4)
    with pytest.raises(VTCError, match="more than the image's 16"):
        tiny_pipe(images[:1], QUESTIONS[:1], method="random", budget=17)
    with pytest.raises(VTCError, match="over the language model's"):
        tiny_pipe(images[:1], ["what " * 300], method="random", budget=4)
