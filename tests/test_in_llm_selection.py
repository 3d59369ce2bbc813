"""Which image rows each in-LLM method keeps, checked against naive references.

Every reference here is computed outside vtc: a stock model loaded with eager attention,
run at full length with the dropped image tokens hidden by an additive mask, gives the
attention maps (output_attentions), the layer inputs (pre-hooks) and the keys (its KV
cache); each paper's score is then computed from those with plain loops. A stage is
checked given the rows the pruner kept at the stages before it.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vtc.methods import Budget, VTCError, get
from vtc.methods.llm_base import Choice, LLMMethod, Stage
from vtc.models.llm_prune import InLLMPruner
from vtc.testing import save_tiny_llava

from conftest import random_image

QUESTIONS = ["what is the color of the circle ?", "how many red square ?"]
N_LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from vtc.pipeline import Pipeline

    path = save_tiny_llava(tmp_path_factory.mktemp("select") / "llava", image_size=64, text_layers=N_LAYERS)
    pipe = Pipeline.from_pretrained(path)
    eager = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    return pipe, eager


@pytest.fixture(scope="module")
def batch(models):
    """A left-padded batch of two prompts with 64 image tokens each."""
    pipe, _ = models
    images = [random_image(i + 70, size=(50, 60)) for i in range(2)]
    inputs = pipe.prepare(images, QUESTIONS)
    sels, _ = pipe.compress(inputs, QUESTIONS, get("none"), Budget.parse("auto"))
    ids, mask = pipe.adapter.splice_ids(inputs["input_ids"], inputs["attention_mask"], [s.num_tokens for s in sels], pipe.pad_token_id)
    assert not mask.all()  # the two questions differ in length: padding is exercised
    return ids, mask, pipe.adapter.project(sels)


def features(batch) -> dict:
    """A fresh ``mm_encoder_outputs`` (generate replaces the one it is given)."""
    return {"image": BaseModelOutputWithPooling(pooler_output=list(batch[2]))}


# ----------------------------------------------------------------------------- references


def reference_run(eager, batch, alive_from: dict[int, torch.Tensor]):
    """Full-length eager forward; from layer l on, only the positions alive_from[l] (B, L) can be attended to.

    Returns (outputs with attentions and cache, inputs of every decoder layer).
    """
    ids, mask, _ = batch
    length = ids.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    lm = eager.model.language_model
    inputs, handles = {}, []

    def hook(i):
        def run(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
            starts = [l for l in alive_from if l <= i]
            if not starts:
                return args, kwargs
            alive = alive_from[max(starts)] & mask.bool()
            allowed = (causal[None] & alive[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
            additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            return args, {**kwargs, "attention_mask": additive[:, None]}

        return run

    for i, layer in enumerate(lm.layers):
        handles.append(layer.register_forward_pre_hook(hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            out = eager(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch), output_attentions=True, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return out, inputs


def pruned_run(pipe, batch, method, budget):
    """The pruner on the SDPA model; returns the pruner and, per stage layer, the image positions kept per sample."""
    ids, mask, _ = batch
    with torch.no_grad(), InLLMPruner(pipe.model.model.language_model, method, Budget.parse(budget), ids, mask,
                                      pipe.adapter.image_token_id) as pruner:
        pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch))
    kept = {}
    for layer in pruner.stage_at:
        rows = pruner.layer_rows[layer]
        kept[layer] = [set(rows.index[b][rows.valid[b] & rows.image[b]].tolist()) for b in range(ids.shape[0])]
    return pruner, kept


def alive_mask(batch, images: list[list[int]], kept: list[set[int]]) -> torch.Tensor:
    """(B, L) True for every non-image position and the kept image positions."""
    alive = torch.ones_like(batch[1], dtype=torch.bool)
    for b, positions in enumerate(images):
        for p in positions:
            alive[b, p] = p in kept[b]
    return alive


def image_positions(pipe, batch) -> list[list[int]]:
    ids = batch[0]
    image = pipe.adapter.image_token_id
    return [[p for p in range(ids.shape[1]) if ids[b, p] == image] for b in range(ids.shape[0])]


def keep_input(captured: dict):
    def hook(module, args, kwargs):
        captured.setdefault("h", args[0])

    return hook


def top(scores: dict[int, float], k: int) -> set[int]:
    """The k positions with the highest score (plain sort)."""
    return set(sorted(scores, key=lambda p: -scores[p])[:k])


def assert_top(kept: set[int], scores: dict[int, float], k: int, tol: float = 1e-6):
    """``kept`` is a top-k set of ``scores`` (a swap across an exact-looking tie within ``tol`` is allowed)."""
    assert len(kept) == k
    assert set(kept) <= set(scores)
    worst_kept = min(scores[p] for p in kept)
    best_dropped = max((scores[p] for p in scores if p not in kept), default=-math.inf)
    assert worst_kept >= best_dropped - tol, (worst_kept, best_dropped)


def last_token_attention(attn: torch.Tensor, b: int, positions) -> dict[int, float]:
    """Head-mean attention of the last row (the last prompt token) to each position, by a plain loop over heads."""
    heads = attn.shape[1]
    return {p: sum(float(attn[b, h, -1, p]) for h in range(heads)) / heads for p in positions}


# ----------------------------------------------------------------------------- one method at a time


def test_fastv_keeps_the_top_k_of_layer_k_minus_1s_last_token_attention(models, batch):
    pipe, eager = models
    images = image_positions(pipe, batch)
    _, kept = pruned_run(pipe, batch, get("fastv", layer=2), 12)
    out, _ = reference_run(eager, batch, {})
    for b, positions in enumerate(images):
        assert_top(kept[2][b], last_token_attention(out.attentions[1], b, positions), 12)  # layer K-1 = 1


def test_pyramiddrop_keeps_the_top_of_each_stage_layers_own_last_token_attention(models, batch):
    pipe, eager = models
    images = image_positions(pipe, batch)
    method = get("pyramiddrop", layers=(1, 2, 3))
    plan = method.plan(64, N_LAYERS, Budget.parse(20))
    pruner, kept = pruned_run(pipe, batch, method, 20)
    alive_from, current = {}, [set(p) for p in images]
    for stage in plan:
        out, _ = reference_run(eager, batch, alive_from)
        for b in range(len(images)):
            scores = last_token_attention(out.attentions[stage.layer], b, sorted(current[b]))  # the stage layer's own q/k
            assert_top(kept[stage.layer][b], scores, stage.keep)
        current = kept[stage.layer]
        alive_from[stage.layer] = alive_mask(batch, images, current)
    assert [s.keep for s in plan] == sorted((s.keep for s in plan), reverse=True) and plan[-1].keep < 64


def raters(embeds: torch.Tensor, image: list[int], text: list[int]) -> list[int]:
    """SparseVLM's text raters by a plain loop: softmax over the text of image . text, averaged over the image tokens."""
    relevance = [0.0] * len(text)
    for i in image:
        logits = [float(embeds[i] @ embeds[t]) for t in text]
        top_logit = max(logits)
        weights = [math.exp(v - top_logit) for v in logits]
        for j, w in enumerate(weights):
            relevance[j] += w / sum(weights) / len(image)
    mean = sum(relevance) / len(relevance)
    return [t for t, r in zip(text, relevance) if r > mean]


def rater_scores(attn: torch.Tensor, b: int, rows: list[int], positions) -> dict[int, float]:
    heads = attn.shape[1]
    return {p: sum(float(attn[b, h, r, p]) for h in range(heads) for r in rows) / heads / len(rows) for p in positions}


def text_positions(batch, b: int, images: list[int]) -> list[int]:
    ids, mask, _ = batch
    return [p for p in range(max(images) + 1, ids.shape[1]) if mask[b, p]]


def test_sparsevlm_without_recycling_keeps_the_top_by_rater_attention_of_the_layer_before(models, batch):
    pipe, eager = models
    images = image_positions(pipe, batch)
    method = get("sparsevlm", layers=(1, 2, 3), recycling=False)
    plan = method.plan(64, N_LAYERS, Budget.parse(20))
    _, kept = pruned_run(pipe, batch, method, 20)
    alive_from, current = {}, [set(p) for p in images]
    first, inputs = reference_run(eager, batch, {})
    rater_rows = [raters(inputs[0][b], images[b], text_positions(batch, b, images[b])) for b in range(len(images))]
    for stage in plan:
        out, _ = reference_run(eager, batch, alive_from)
        for b in range(len(images)):
            scores = rater_scores(out.attentions[stage.layer - 1], b, rater_rows[b], sorted(current[b]))
            assert_top(kept[stage.layer][b], scores, stage.keep)
        current = kept[stage.layer]
        alive_from[stage.layer] = alive_mask(batch, images, current)


def naive_density_peaks(x: list[torch.Tensor], clusters: int):
    """TCFormer's DPC-kNN as the official SparseVLM code describes it, with plain loops: (labels, centers)."""
    n, dim = len(x), x[0].numel()
    dist = [[float(((x[i] - x[j]) ** 2).sum().sqrt()) / math.sqrt(dim) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d**2 for d in sorted(dist[i])[:clusters]) / clusters) for i in range(n)]  # self included
    largest = max(max(row) for row in dist)
    # mutual nearest neighbours tie exactly (k = 2 here); vtc's documented rule: the later row is the denser
    denser = [[density[j] > density[i] or (density[j] == density[i] and j > i) for j in range(n)] for i in range(n)]
    parent = [min([dist[i][j] for j in range(n) if denser[i][j]], default=largest) for i in range(n)]
    centers = sorted(range(n), key=lambda i: -density[i] * parent[i])[:clusters]
    labels = [min(range(clusters), key=lambda c: dist[i][centers[c]]) for i in range(n)]
    return labels, centers


def test_sparsevlm_recycles_the_best_dropped_tokens_into_cluster_means(models, batch):
    pipe, eager = models
    images = image_positions(pipe, batch)
    keep = 20  # one stage before layer 1: a layer average of (64 + 3 x 20) / 4 = 31
    method = get("sparsevlm", layers=(1,))
    captured = {}
    ids, mask, _ = batch
    lm = pipe.model.model.language_model
    with torch.no_grad(), InLLMPruner(lm, method, Budget.parse(31), ids, mask, pipe.adapter.image_token_id) as pruner:
        probe = lm.layers[1].register_forward_pre_hook(keep_input(captured), with_kwargs=True)
        try:
            pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch))
        finally:
            probe.remove()
    assert [s.keep for s in method.plan(64, N_LAYERS, Budget.parse(31))] == [keep]
    out, inputs = reference_run(eager, batch, {})
    rows = pruner.rows
    for b in range(len(images)):
        rater_rows = raters(inputs[0][b], images[b], text_positions(batch, b, images[b]))
        scores = rater_scores(out.attentions[0], b, rater_rows, images[b])
        ranked = sorted(images[b], key=lambda p: -scores[p])
        image_rows = [r for r in range(rows.index.shape[1]) if rows.valid[b, r] and rows.image[b, r]]
        merged = pruner.infos[b]["recycled"]
        assert merged >= 1 and len(image_rows) == keep
        # kept: the top keep - merged; pool: the best 30% (+1) of ALL the rest, so no rank is lost in between
        kept = set(ranked[: keep - merged])
        dropped = ranked[keep - merged :]
        pool = dropped[: int(0.3 * len(dropped)) + 1]
        assert merged == len(pool) // 10 + 1
        labels, centers = naive_density_peaks([inputs[1][b, p] for p in pool], merged)
        expected = {pool[c]: torch.stack([inputs[1][b, pool[i]] for i in range(len(pool)) if labels[i] == j]).mean(0)
                    for j, c in enumerate(centers)}
        got_positions = [int(rows.index[b, r]) for r in image_rows]
        assert set(got_positions) == kept | set(expected)
        for r in image_rows:
            p = int(rows.index[b, r])
            if p in expected:
                torch.testing.assert_close(captured["h"][b, r], expected[p], atol=1e-5, rtol=1e-5)
        # the merged rows sit after the kept image rows: positions are not increasing along the rows
        assert got_positions != sorted(got_positions)


class ScoredContext:
    """A stage context whose rater attention ranks 100 image tokens 0, 1, 2, ... (token j scores 99 - j)."""

    def __init__(self, hidden):
        self.hidden = self.previous = self.embeds = hidden[None]
        self.image_rows, self.text_rows, self.last_row = [torch.arange(100)], [torch.arange(100, 104)], 103

    def positions(self, b):
        return torch.arange(104)

    def attention(self, layer, states, queries, rope=True, keys=None):
        row = torch.cat([torch.arange(99.0, -1.0, -1.0), torch.zeros(4)]) / 1e4
        return [row[keys[0]].expand(len(q), -1) if keys else row.expand(len(q), -1) for q in queries]


def test_sparsevlm_pool_reaches_ranks_just_inside_the_budget():
    """Hand case: keep 60 of 100 with recycling. 40 dropped would give 13 pooled -> 2 clusters, counted inside the 60:
    the top 58 are kept and the pool is ranks 58..70, so ranks 58 and 59 (marked) are merged, not lost."""
    hidden = torch.zeros(104, 8)
    hidden[:, 1] = torch.arange(104.0) / 100
    hidden[58:60, 0] = 100.0  # ranks 58 and 59
    choice = get("sparsevlm", layers=(1,)).choose(0, [Stage(1, 60)], ScoredContext(hidden))[0]
    assert choice.keep.tolist() == list(range(58)) and choice.info["recycled"] == 2
    assert choice.merged.shape == (2, 8)
    assert float(choice.merged[:, 0].max()) >= 100.0 * 2 / 13  # a cluster holds the marked ranks
    assert set(choice.merged_positions.tolist()) <= set(range(58, 71))  # centers come from the pool


@torch.no_grad()
def feather_scores(eager, inputs, layer: int, b: int, positions: list[int]) -> dict[int, float]:
    """FEATHER's score by a plain loop: last token's q . k of layer-1 WITHOUT RoPE, softmax over the image keys only."""
    block = eager.model.language_model.layers[layer - 1]
    attn = block.self_attn
    h = block.input_layernorm(inputs[layer - 1][b])
    q = attn.q_proj(h[-1]).view(-1, attn.head_dim)
    k = attn.k_proj(h).view(h.shape[0], -1, attn.head_dim)
    heads, groups = q.shape[0], q.shape[0] // k.shape[1]
    total = {p: 0.0 for p in positions}
    for head in range(heads):
        logits = {p: float(q[head] @ k[p, head // groups]) / math.sqrt(attn.head_dim) for p in positions}
        top_logit = max(logits.values())
        norm = sum(math.exp(v - top_logit) for v in logits.values())
        for p in positions:
            total[p] += math.exp(logits[p] - top_logit) / norm / heads
    return total


def test_feather_stage_one_is_top_plus_grid_and_stage_two_keeps_nine_percent_of_the_survivors(models, batch):
    pipe, eager = models
    images = image_positions(pipe, batch)
    _, kept = pruned_run(pipe, batch, get("feather", layers=(1, 2)), "auto")
    with torch.no_grad():
        _, inputs = reference_run(eager, batch, {})
    for b, positions in enumerate(images):
        grid = {positions[r * 8 + c] for r in range(0, 8, 3) for c in range(0, 8, 3)}  # every 3rd row and column of 8 x 8
        scores = feather_scores(eager, inputs, 1, b, positions)
        top_t = top(scores, int(64 * 0.3))
        assert kept[1][b] == top_t | grid
    with torch.no_grad():
        _, inputs = reference_run(eager, batch, {1: alive_mask(batch, images, kept[1])})
    for b in range(len(images)):
        m1 = len(kept[1][b])
        scores = feather_scores(eager, inputs, 2, b, sorted(kept[1][b]))
        assert_top(kept[2][b], scores, int(m1 * 0.3 * 0.3))  # the official rule: int(0.09 x M1), not of N
        assert int(m1 * 0.09) != int(64 * 0.09)  # the two rules differ here


def test_feather_second_stage_takes_its_share_of_the_tokens_actually_present():
    """Hand case: 100 image tokens reach stage 2 (planned 50); the official rule keeps int(0.09 x 100) = 9, the best."""
    stage = get("feather").plan(576, 32, Budget.parse("auto"))[1]
    choice = get("feather").choose(1, [Stage(16, 50, share=stage.share)], ScoredContext(torch.zeros(104, 8)))[0]
    assert choice.keep.tolist() == list(range(9))


def test_feather_official_counts_on_llava_15():
    plan = get("feather").plan(576, 32, Budget.parse("auto"))
    # stage 1: int(576 x 0.3) = 172 top tokens + the 64-token grid (an upper bound on M1); stage 2: int(0.09 x 236) = 21
    assert [(s.layer, s.keep) for s in plan] == [(8, 236), (16, 21)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def test_dart_keeps_pivots_by_key_norm_and_the_least_duplicated_tokens(models, batch):
    pipe, eager = models
    images = image_positions(pipe, batch)
    keep = 23  # 4 pivots + 19 picks: 2 per pivot, one more for the first 3 visited
    _, kept = pruned_run(pipe, batch, get("dart", layer=2), keep)
    out, inputs = reference_run(eager, batch, {})
    keys = out.cache.layers[1].keys  # layer K-1's keys after RoPE, as cached by the stock model
    with torch.no_grad():
        final = eager.model.language_model.norm(inputs[2])  # final RMSNorm of layer K-1's output
    for b, positions in enumerate(images):
        norm = {p: float(keys[b, :, p].abs().sum()) for p in range(keys.shape[2])}
        image_pivots = sorted(positions, key=lambda p: -norm[p])[:4]
        text_pivots = sorted(text_positions(batch, b, positions), key=lambda p: -norm[p])[:4]
        order = list(set(image_pivots + text_pivots))  # the official loop runs over a Python set
        pool = [p for p in positions if p not in image_pivots]
        chosen = set(image_pivots)
        for i, pivot in enumerate(order):
            quota = 2 + (1 if i < 3 else 0)
            similarity = {p: cosine(final[b, pivot], final[b, p]) for p in pool}
            picks = sorted(pool, key=lambda p: similarity[p])[:quota]
            chosen |= set(picks)
            pool = [p for p in pool if p not in picks]
        assert kept[2][b] == chosen


# ----------------------------------------------------------------------------- the mask follows original positions


def unpadded_sample(batch):
    """The batch's one prompt without padding, alone (a batch of one)."""
    ids, mask, projected = batch
    full = int(torch.nonzero(mask.bool().all(1))[0])
    return ids[full : full + 1], mask[full : full + 1], projected[full : full + 1]


@pytest.mark.parametrize("alone", [False, True], ids=["padded-batch", "one-unpadded-prompt"])
def test_reordered_rows_attend_by_original_position(models, batch, alone):
    """SparseVLM's merged rows come after the kept image rows but carry earlier positions: compare every row's logits
    with the stock layers run on the same rows sorted by position (plain causal mask, RoPE at those positions).
    Alone, no row is padding: only the reordering rules out SDPA's plain causal path."""
    pipe, _ = models
    batch = unpadded_sample(batch) if alone else batch
    ids, mask, _ = batch
    lm = pipe.model.model.language_model
    captured = {}
    with torch.no_grad(), InLLMPruner(lm, get("sparsevlm", layers=(1,)), Budget.parse(31), ids, mask, pipe.adapter.image_token_id) as pruner:
        probe = lm.layers[1].register_forward_pre_hook(keep_input(captured), with_kwargs=True)
        try:
            pruned = pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch))
        finally:
            probe.remove()
    rows = pruner.rows
    for b in range(ids.shape[0]):
        real = torch.nonzero(rows.valid[b] & mask[b][rows.index[b]].bool()).squeeze(1)
        positions = rows.index[b, real]
        assert not bool((positions[1:] > positions[:-1]).all())  # really reordered
        order = torch.argsort(positions)
        h = captured["h"][b, real[order]][None]
        pos = positions[order][None]
        n = h.shape[1]
        with torch.no_grad():
            rope = lm.rotary_emb(h, position_ids=pos)
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
            for layer in lm.layers[1:]:
                h = layer(h, attention_mask=causal, position_ids=pos, position_embeddings=rope)
            logits = pipe.model.lm_head(lm.norm(h))[0]
        torch.testing.assert_close(pruned.logits[b, real[order]], logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- attention implementations and refusals


def test_pruned_output_under_eager_attention_equals_sdpa(models, batch):
    pipe, eager = models
    ids, mask, _ = batch
    results = []
    for model in (pipe.model, eager):
        method = get("sparsevlm", layers=(1, 2))  # padding and reordered (recycled) rows
        with torch.no_grad(), InLLMPruner(model.model.language_model, method, Budget.parse(24), ids, mask, pipe.adapter.image_token_id) as pr:
            logits = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch)).logits
        with torch.no_grad(), InLLMPruner(model.model.language_model, get("sparsevlm", layers=(1, 2)), Budget.parse(24), ids, mask,
                                          pipe.adapter.image_token_id):
            tokens = model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch), max_new_tokens=5, do_sample=False,
                                    pad_token_id=pipe.pad_token_id, output_scores=True, return_dict_in_generate=True)
        results.append((logits, pr.rows.valid, tokens))
    (sdpa, valid, gen_s), (eag, _, gen_e) = results
    torch.testing.assert_close(eag[valid], sdpa[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen_e.sequences, gen_s.sequences)
    for step_s, step_e in zip(gen_s.scores, gen_e.scores):  # decoding steps use the converted mask too
        torch.testing.assert_close(step_e, step_s, atol=1e-4, rtol=1e-4)


def generate_under_pruner(pipe, batch, **kwargs):
    ids, mask, projected = batch
    if "assistant_model" in kwargs:  # assisted decoding runs one prompt at a time
        full = int(torch.nonzero(mask.bool().all(1))[0])
        batch = ids, mask, projected = ids[full : full + 1], mask[full : full + 1], projected[full : full + 1]
    with torch.no_grad(), InLLMPruner(pipe.model.model.language_model, get("fastv", layer=2), Budget.parse(16), ids, mask,
                                      pipe.adapter.image_token_id):
        return pipe.model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch), do_sample=False,
                                   pad_token_id=pipe.pad_token_id, **{"max_new_tokens": 3, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 2}, "beam search"),
    ({"cache_implementation": "static"}, "dynamic KV cache"),
    ({"assistant_model": "eager"}, "assisted decoding"),
    ({"use_cache": False}, "use_cache=False"),
])
def test_generation_modes_that_break_the_rows_are_refused(models, batch, kwargs, message):
    pipe, eager = models
    if "assistant_model" in kwargs:
        kwargs = {"assistant_model": eager}
    with pytest.raises(VTCError, match=message):
        generate_under_pruner(pipe, batch, **kwargs)


def test_right_padding_and_unmaskable_attention_are_refused(models, batch):
    pipe, _ = models
    ids, mask, _ = batch
    lm = pipe.model.model.language_model
    right_ids, right_mask = ids.clone(), mask.clone()
    b = int(torch.nonzero(~mask.bool().all(1))[0])
    shift = int((~mask[b].bool()).sum())
    right_ids[b], right_mask[b] = ids[b].roll(-shift), mask[b].roll(-shift)
    with pytest.raises(VTCError, match="left-padded"):
        InLLMPruner(lm, get("fastv"), Budget.parse(16), right_ids, right_mask, pipe.adapter.image_token_id)
    flash = SimpleNamespace(layers=lm.layers, norm=lm.norm, config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(VTCError, match="flash_attention_2.*sdpa"):
        InLLMPruner(flash, get("fastv"), Budget.parse(16), ids, mask, pipe.adapter.image_token_id)


def test_reported_layer_average_counts_what_was_kept(models, batch):
    pipe, _ = models
    pruner, kept = pruned_run(pipe, batch, get("feather", layers=(1, 2)), "auto")
    for b in range(2):
        per_layer = [64] + [len(kept[1][b])] + [len(kept[2][b])] * 2  # layers 0, 1, 2, 3
        assert pruner.average_tokens[b] == sum(per_layer) / 4


# ----------------------------------------------------------------------------- rows, padding and decoding masks


class FixedKeep(LLMMethod):
    """Keeps every other image row of sample b, ``counts[b]`` of them, before ``layer``; merges nothing."""

    name = "fixed-keep"

    def __init__(self, layer: int, counts: list[int]):
        self.layer, self.counts = layer, counts

    def plan(self, n_image, num_layers, budget):
        return [Stage(self.layer, n_image)]

    def choose(self, index, stages, ctx):
        return [Choice(img[::2][:c]) for img, c in zip(ctx.image_rows, self.counts)]


@pytest.mark.parametrize("counts", [(10, 12), (10, 20)])
def test_dummy_rows_stay_hidden_in_prefill_and_decoding(models, batch, counts):
    """Sample 1 has 3 padding tokens. Keeping (10, 12) leaves it ONE dummy row (positions still increase along the
    rows); keeping (10, 20) gives the unpadded sample 0 dummy rows (their position 0 is a real token). Prefill logits
    and the first decoding step must equal the stock eager model run at full length with the dropped image tokens
    hidden from layer 2 on."""
    pipe, eager = models
    ids, mask, projected = batch
    lm = pipe.model.model.language_model
    with torch.no_grad(), InLLMPruner(lm, FixedKeep(2, list(counts)), Budget.parse(1.0), ids, mask, pipe.adapter.image_token_id) as pruner:
        out = pipe.model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch), max_new_tokens=2,
                                  do_sample=False, pad_token_id=pipe.pad_token_id, output_scores=True, output_logits=True,
                                  return_dict_in_generate=True)
    rows = pruner.layer_rows[2]
    assert int((~rows.valid).sum()) >= 1
    images = image_positions(pipe, batch)
    kept = [set(rows.index[b][rows.valid[b] & rows.image[b]].tolist()) for b in range(2)]
    assert [len(k) for k in kept] == list(counts)
    # prefill: the next-token logits (the last prompt row) against the masked full-length reference
    reference, _ = reference_run(eager, batch, {2: alive_mask(batch, images, kept)})
    torch.testing.assert_close(out.logits[0], reference.logits[:, -1], atol=1e-4, rtol=1e-4)
    # first decoding step: the prompt plus the generated token, the new position alive
    grown = (out.sequences[:, : ids.shape[1] + 1], torch.cat([mask, torch.ones_like(mask[:, :1])], 1), projected)
    alive = torch.cat([alive_mask(batch, images, kept), torch.ones_like(mask[:, :1], dtype=torch.bool)], 1)
    reference, _ = reference_run(eager, grown, {2: alive})
    torch.testing.assert_close(out.logits[1], reference.logits[:, -1], atol=1e-4, rtol=1e-4)


class MergeOne(LLMMethod):
    """Keeps image rows 0, 1, 2 and the last; merges the others into one token at the position of image row 4."""

    name = "merge-one"

    def plan(self, n_image, num_layers, budget):
        return [Stage(1, 5)]

    def choose(self, index, stages, ctx):
        choices = []
        for b, img in enumerate(ctx.image_rows):
            keep = torch.cat([img[:3], img[-1:]])
            merged = ctx.hidden[b, img[3:-1]].mean(0, keepdim=True)
            choices.append(Choice(keep, merged, ctx.positions(b)[img[4:5]]))
        return choices


def test_merged_tokens_sit_right_after_the_kept_image_rows(models, batch):
    pipe, _ = models
    ids, mask, _ = batch
    with torch.no_grad(), InLLMPruner(pipe.model.model.language_model, MergeOne(), Budget.parse(1.0), ids, mask,
                                      pipe.adapter.image_token_id) as pruner:
        pipe.model(input_ids=ids, attention_mask=mask, mm_encoder_outputs=features(batch))
    rows = pruner.rows
    for b, positions in enumerate(image_positions(pipe, batch)):
        real = [p for p in range(ids.shape[1]) if mask[b, p]]
        before, after = [p for p in real if p < positions[0]], [p for p in real if p > positions[-1]]
        expected = before + positions[:3] + positions[-1:] + [positions[4]] + after
        assert rows.index[b][rows.valid[b]].tolist() == expected
        assert rows.image[b][rows.valid[b]].tolist() == [p in positions for p in expected]


def test_padding_on_both_sides_and_a_prompt_without_image_tokens_are_refused(models, batch):
    pipe, _ = models
    ids, mask, _ = batch
    lm = pipe.model.model.language_model
    b = int(torch.nonzero(~mask.bool().all(1))[0])  # the left-padded prompt: pad, real ..., then pad its end too
    both = mask.clone()
    both[b, -1] = 0
    with pytest.raises(VTCError, match="left-padded"):
        InLLMPruner(lm, get("fastv"), Budget.parse(16), ids, both, pipe.adapter.image_token_id)
    no_image = ids.clone()
    no_image[b][no_image[b] == pipe.adapter.image_token_id] = int(ids[b, -1])
    with pytest.raises(VTCError, match="image tokens in every prompt"):
        InLLMPruner(lm, get("fastv"), Budget.parse(16), no_image, mask, pipe.adapter.image_token_id)
