"""Dropping image-token rows inside a stock Hugging Face Llama during prefill, with SDPA kept.

How it works (no modelling file is forked; everything is forward pre-hooks on the stock
decoder layers, so stock ``generate()`` drives prefill and decoding):

* Prefill. Each pre-hook sees the hidden rows the previous layer produced and the
  model's full-length keyword arguments. Once a stage has pruned, every later layer gets
  the rotary (cos, sin) of its rows' ORIGINAL positions (RoPE positions are kept, as in
  FastV) and a boolean mask built from those positions: causal by original position,
  padding and dropped-slot columns hidden. The layers therefore write only the kept rows
  into the KV cache: the cache of layers >= the first pruning layer is shorter.
* Batches. Samples may keep different numbers of tokens: shorter ones are left-padded
  with masked dummy rows (zeros), which no real token ever attends to.
* Decoding. Positions come from the stock model (layer 0's full cache length, i.e. the
  original positions continue); for pruned layers the hook swaps the mask for one that
  matches that layer's shorter cache.
* Attention implementations. Masks are built for the one the model runs: boolean for
  SDPA, additive (0 / dtype minimum) for eager, which adds the mask to the scores; any
  other implementation (flash, flex, ...) is refused, since it cannot take these masks.
* Refused, with a VTCError, because rows no longer match the prompt: batches expanded by
  generate (beam search, several return sequences), a second full-length forward
  (assisted decoding, ``use_cache=False``), multi-token decoding steps, caches other than
  the dynamic one (a static cache keeps one slot per original position), right padding.
* Scores. ``PruneContext.attention`` recomputes only the requested query rows from a
  layer's input (its input_layernorm, q_proj, k_proj, the per-head q/k norms of decoders
  that have them (Qwen3), RoPE as the model applies it, GQA heads repeated), softmax in
  fp32, mean over heads. The N x N map is never built.
* DeepStack (Qwen3-VL): the decoder adds visual features to the image rows after each of
  its first layers. Once rows are pruned, each remaining image row gets the feature of its
  original position (the stock addition, restricted to the kept rows); a row merged from
  several (SparseVLM's recycling) has no feature of its own, so merging before the last
  addition is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..env import check_torchvision

check_torchvision()  # before transformers: a torchvision that cannot load fails there with a traceback

from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from ..methods.base import Budget, VTCError  # noqa: E402
from ..methods.llm_base import Choice, LLMMethod, Stage, average_tokens  # noqa: E402


MASKABLE = ("sdpa", "eager")  # implementations that take an arbitrary 4-D mask


def attention_implementation(language_model) -> str:
    impl = getattr(language_model.config, "_attn_implementation", None) or "eager"
    if impl not in MASKABLE:
        raise VTCError(f"in-LLM pruning needs attention that takes a 4-D mask ({' or '.join(MASKABLE)}); "
                       f"this model runs '{impl}': load it with attn_implementation='sdpa'")
    return impl


def check_left_padded(pad: torch.Tensor) -> None:
    """Padding must come first in every row (generate's convention for decoder-only models)."""
    if (pad[:, :-1] & ~pad[:, 1:]).any():
        raise VTCError("in-LLM pruning needs left-padded inputs (padding before the prompt); these are right-padded: "
                       "tokenize with padding_side='left'")


@dataclass
class Rows:
    """The current rows of the pruned sequence, per sample (B, L')."""

    index: torch.Tensor  # original sequence position of each row
    valid: torch.Tensor  # False for dummy (padding) rows
    image: torch.Tensor  # True for image-token rows


class PruneContext:
    """What an LLMMethod reads at a stage: layer inputs and attention rows recomputed from q/k."""

    def __init__(self, pruner: "InLLMPruner", hidden, previous, rope):
        self.pruner, self.hidden, self.previous, self._rope = pruner, hidden, previous, rope
        rows = pruner.rows or pruner.full
        self.rows = rows
        self.image_rows = [torch.nonzero(rows.image[b] & rows.valid[b]).squeeze(1) for b in range(hidden.shape[0])]
        after = [rows.index[b] > pruner.image_end[b] for b in range(hidden.shape[0])]
        self.text_rows = [torch.nonzero(after[b] & rows.valid[b]).squeeze(1) for b in range(hidden.shape[0])]
        self.last_row = hidden.shape[1] - 1
        self.embeds = pruner.embeds

    def _project(self, layer: int, states: torch.Tensor, rope: bool):
        attn = self.pruner.layers[layer].self_attn
        h = self.pruner.layers[layer].input_layernorm(states)
        b, length, _ = h.shape
        q = attn.q_proj(h).view(b, length, -1, attn.head_dim)
        k = attn.k_proj(h).view(b, length, -1, attn.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMS norm of each head's query and key, before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope:
            cos, sin = self._rope
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, attn.scaling

    def attention(self, layer, states, queries, rope=True, keys=None):
        """Per sample b: (len(queries[b]), keys) head-mean softmax attention of ``layer`` computed on ``states``.

        Keys are all current rows under the model's causal/padding mask, or, when ``keys``
        is given, only those rows (softmax over them alone, as FEATHER scores).
        """
        q, k, scaling = self._project(layer, states, rope)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        out = []
        for b, qrows in enumerate(queries):
            cols = torch.arange(k.shape[2]) if keys is None else keys[b]
            logits = torch.einsum("hqd,hkd->hqk", q[b][:, qrows].float(), k[b][:, cols].float()) * scaling
            if keys is None:
                allowed = self.pruner.allowed(b, qrows, cols)
                logits = logits.masked_fill(~allowed[None], float("-inf"))
            out.append(logits.softmax(-1).mean(0))
        return out

    def positions(self, b: int) -> torch.Tensor:
        """Original sequence positions of sample b's current rows."""
        return self.rows.index[b]

    def keys(self, layer, states, rope=True):
        """(B, L', kv_heads * head_dim) keys of ``layer`` on ``states`` (after RoPE when ``rope``)."""
        _, k, _ = self._project(layer, states, rope)
        return k.transpose(1, 2).flatten(2)

    def final_norm(self, states):
        return self.pruner.norm(states)


class InLLMPruner:
    """Context manager: while active, prefill through ``language_model`` prunes image rows as ``method`` plans."""

    def __init__(self, language_model, method: LLMMethod, budget: Budget, input_ids, attention_mask, image_token_id: int):
        self.lm, self.method = language_model, method
        self.layers, self.norm = language_model.layers, language_model.norm
        self.num_layers = len(self.layers)
        if budget.is_auto and not method.supports_auto:
            raise VTCError(f"in-LLM method '{method.name}' has no default schedule for budget 'auto'; give a token count or ratio")
        self.attn_impl = attention_implementation(language_model)
        self.pad = attention_mask.bool()
        check_left_padded(self.pad)
        image = (input_ids == image_token_id) & self.pad
        counts = image.sum(1).tolist()
        if min(counts) == 0:
            raise VTCError("in-LLM pruning needs image tokens in every prompt")
        self.image_end = [int(torch.nonzero(image[b]).max()) for b in range(image.shape[0])]
        self.plans = [method.plan(n, self.num_layers, budget) for n in counts]
        if len({tuple(s.layer for s in p) for p in self.plans}) != 1:
            raise VTCError(f"{method.name}: samples of one batch must prune at the same layers")
        self.stage_at = {s.layer: i for i, s in enumerate(self.plans[0])}
        self.counts = counts
        self.kept_at: list[dict[int, int]] = [{} for _ in counts]  # per sample: stage layer -> image tokens it kept
        b, length = input_ids.shape
        self.full = Rows(torch.arange(length).expand(b, length).clone(), self.pad.clone(), image)  # padding is not a real row
        self.rows: Rows | None = None  # None until the first stage prunes
        self._row_args: dict | None = None  # layer arguments for the current rows (reset when rows change)
        self.layer_rows: dict[int, Rows] = {}
        self.prefilled, self.decode_step, self.embeds = False, 0, None
        self.previous = None
        self.merged_at: int | None = None  # first layer whose stage added merged rows
        self.infos: list[dict] = [{} for _ in range(b)]
        self._handles = []

    # ------------------------------------------------------------------ masks and rows

    def allowed(self, b: int, qrows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(q, k) True where query row may attend key row: causal by original position, real keys only."""
        rows = self.rows or self.full
        qi, ki = rows.index[b][qrows], rows.index[b][cols]
        ok = (ki[None, :] <= qi[:, None]) & rows.valid[b][cols][None, :] & self.pad[b][ki][None, :]
        return ok | (qrows[:, None] == cols[None, :])

    def _prefill_mask(self, dtype: torch.dtype) -> torch.Tensor:
        rows = self.rows
        n = rows.index.shape[1]
        all_rows = torch.arange(n)
        return self._for_implementation(torch.stack([self.allowed(b, all_rows, all_rows) for b in range(rows.index.shape[0])])[:, None], dtype)

    def _for_implementation(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """SDPA takes the boolean mask as is; eager adds the mask to the scores, so it needs 0 / -large."""
        if self.attn_impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def _row_kwargs(self, kwargs: dict) -> dict:
        """The model's full-length layer arguments, restricted to the current rows.

        Rows change only at stages, so the gathered positions and the mask are built once per
        stage and reused by every later layer of that stage.
        """
        if self._row_args is None:
            idx = self.rows.index
            cos, sin = kwargs["position_embeddings"]
            pick = lambda t: t.expand(idx.shape[0], *t.shape[1:]).gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
            self._row_args = {
                "position_embeddings": (pick(cos), pick(sin)),
                "attention_mask": None if self._plainly_causal() else self._prefill_mask(cos.dtype),
            }
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                self._row_args["position_ids"] = kwargs["position_ids"].expand(idx.shape[0], -1).gather(1, idx)
        return {**kwargs, **self._row_args}

    def _plainly_causal(self) -> bool:
        """No dummy rows, no padding, positions increasing along the rows: SDPA's own causal path is exact (and faster)."""
        rows = self.rows
        return self.attn_impl == "sdpa" and bool(rows.valid.all() and self.pad.all() and (rows.index[:, 1:] > rows.index[:, :-1]).all())

    def _apply(self, choices: list[Choice], hidden: torch.Tensor) -> torch.Tensor:
        """New rows: every non-image real row, the kept image rows, merged tokens after them; left-padded."""
        rows = self.rows or self.full
        seqs = []
        for b, choice in enumerate(choices):
            keep = torch.zeros(rows.index.shape[1], dtype=torch.bool)
            keep[rows.valid[b] & ~rows.image[b]] = True
            keep[choice.keep] = True
            kept = torch.nonzero(keep).squeeze(1)
            h, idx, img = hidden[b, kept], rows.index[b, kept], rows.image[b, kept]
            if choice.merged is not None and choice.merged.shape[0]:
                at = int(torch.nonzero(img).max()) + 1 if img.any() else int((idx < self.image_end[b]).sum())
                m = choice.merged.shape[0]
                h = torch.cat([h[:at], choice.merged.to(h.dtype), h[at:]])
                idx = torch.cat([idx[:at], choice.merged_positions.to(idx.dtype), idx[at:]])
                img = torch.cat([img[:at], torch.ones(m, dtype=torch.bool), img[at:]])
            seqs.append((h, idx, img))
            self.infos[b].update(choice.info)
        width = max(s[0].shape[0] for s in seqs)
        bsz, dim = hidden.shape[0], hidden.shape[2]
        new_h = hidden.new_zeros(bsz, width, dim)
        index = torch.zeros(bsz, width, dtype=torch.long)
        valid = torch.zeros(bsz, width, dtype=torch.bool)
        image = torch.zeros(bsz, width, dtype=torch.bool)
        for b, (h, idx, img) in enumerate(seqs):
            n = h.shape[0]
            new_h[b, width - n :], index[b, width - n :], valid[b, width - n :], image[b, width - n :] = h, idx, True, img
        self.rows = Rows(index, valid, image)
        self._row_args = None
        return new_h

    @property
    def average_tokens(self) -> list[float]:
        """Image tokens per decoder layer, averaged over the layers: as kept once prefill ran, as planned before."""
        out = []
        for plan, n, kept in zip(self.plans, self.counts, self.kept_at):
            out.append(average_tokens([Stage(s.layer, kept.get(s.layer, s.keep)) for s in plan], n, self.num_layers))
        return out

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer_idx == 0:
                self._check_forward(hidden, kwargs)
            if self.prefilled:
                if layer_idx == 0:
                    self.decode_step += 1
                if layer_idx in self.layer_rows:
                    kwargs = dict(kwargs)
                    kwargs["attention_mask"] = self._decode_mask(layer_idx, hidden.dtype)
                return args, kwargs
            if layer_idx == 0:
                self.embeds = hidden
            current = self._row_kwargs(kwargs) if self.rows is not None else kwargs
            if layer_idx in self.stage_at:
                stage_no = self.stage_at[layer_idx]
                # rows only change at stages, so the previous layer's input has the same rows and positions
                previous = self.previous if self.previous is not None else hidden
                ctx = PruneContext(self, hidden, previous, current["position_embeddings"])
                choices = self.method.choose(stage_no, [p[stage_no] for p in self.plans], ctx)
                hidden = self._apply(choices, hidden)
                if self.merged_at is None and any(c.merged is not None and c.merged.shape[0] for c in choices):
                    self.merged_at = layer_idx
                for b, n in enumerate(self.kept_counts()):
                    self.kept_at[b][layer_idx] = n
                current = self._row_kwargs(kwargs)
            if self.rows is not None:
                self.layer_rows[layer_idx] = self.rows
            self.previous = hidden
            new_args = (hidden,) + tuple(args[1:]) if args else args
            if not args:
                current["hidden_states"] = hidden
            return new_args, current

        return hook

    def _decode_mask(self, layer_idx: int, dtype: torch.dtype) -> torch.Tensor:
        rows = self.layer_rows[layer_idx]
        prompt = rows.valid & self.pad.gather(1, rows.index)
        if prompt.all():
            return None  # every cached row is real: one query row may attend to all of them
        new = torch.ones(prompt.shape[0], self.decode_step, dtype=torch.bool)
        return self._for_implementation(torch.cat([prompt, new], dim=1)[:, None, None, :], dtype)

    def _check_forward(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """Refuse forwards whose rows are not the prompt the pruner was built for (or its one-token continuation)."""
        batch, length = self.full.index.shape
        if hidden.shape[0] != batch:
            raise VTCError(f"in-LLM pruning was set up for {batch} prompts but the model ran {hidden.shape[0]} rows: "
                           "beam search and several return sequences are not supported (use num_beams=1)")
        expected = 1 if self.prefilled else length
        if hidden.shape[1] != expected:
            what = "a one-token decoding step" if self.prefilled else f"the {length}-token prompt"
            raise VTCError(f"in-LLM pruning expected {what} but the model ran {hidden.shape[1]} tokens: assisted decoding, "
                           "generate(use_cache=False) and repeated forwards in one pruning context are not supported")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and not isinstance(cache, DynamicCache):
            raise VTCError(f"in-LLM pruning needs the dynamic KV cache (pruned layers cache fewer rows); got {type(cache).__name__}: "
                           "do not pass a static cache or cache_implementation")

    def _done_prefill(self, module, args, output):
        self.prefilled = True

    def _deepstack_process(self, stock):
        """The decoder's DeepStack addition on the current rows: each image row gets its original position's feature."""

        def process(hidden, visual_pos_masks, visual_embeds):
            if self.rows is None:
                return stock(hidden, visual_pos_masks, visual_embeds)
            if self.merged_at is not None:
                raise VTCError(
                    f"'{self.method.name}' merged image rows into new ones at decoder layer {self.merged_at}, before this "
                    "model's last DeepStack addition, and a merged row has no DeepStack feature: prune at a later layer "
                    "or without merging (SparseVLM: recycling=False)")
            rows = self.rows
            full = visual_embeds.new_zeros(*visual_pos_masks.shape, visual_embeds.shape[-1])
            full[visual_pos_masks.to(full.device)] = visual_embeds
            added = full.gather(1, rows.index.to(full.device)[..., None].expand(-1, -1, full.shape[-1]))
            real = (rows.valid & rows.image).to(full.device)[..., None]  # dummy rows stay zero
            return hidden + (added * real).to(hidden.dtype)

        return process

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
        self._handles.append(self.layers[-1].register_forward_hook(self._done_prefill))
        if hasattr(self.lm, "_deepstack_process"):
            self.lm._deepstack_process = self._deepstack_process(self.lm._deepstack_process)
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if "_deepstack_process" in vars(self.lm):
            del self.lm._deepstack_process
        return False

    # ------------------------------------------------------------------ reporting

    def kept_counts(self) -> list[int]:
        """Image tokens per sample after the last stage."""
        rows = self.rows or self.full
        return [int((rows.image[b] & rows.valid[b]).sum()) for b in range(rows.index.shape[0])]
