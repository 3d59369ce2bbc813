"""The CLIP pieces Recoverable Compression needs besides the LLaVA vision tower.

LLaVA checkpoints carry only CLIP's vision tower, without the text tower and
without the visual projection; text-to-patch similarity needs all three. The
user points vtc at the CLIP checkpoint the LLaVA tower came from (for LLaVA-1.5:
openai/clip-vit-large-patch14-336); we load its text tower with projection,
its tokenizer, and its visual projection + post-layernorm (small tensors read
straight from the safetensors files, so the vision tower is not loaded twice).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..methods.base import TextSpec, VTCError

_VISUAL_KEYS = {
    "visual_projection.weight": "projection",
    "vision_model.post_layernorm.weight": "ln_weight",
    "vision_model.post_layernorm.bias": "ln_bias",
}


class ClipTextScorer(torch.nn.Module):
    """cosine(text embedding of a query, projected patch states) for every patch (final layer, or the feature layer)."""

    reads = "final"  # the adapter passes the tower's patch states (CLS dropped): final ones unless TextSpec.patch_states says "feature"

    def __init__(self, text_model, tokenizer, projection: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float):
        super().__init__()
        self.text_model = text_model.eval()
        self.tokenizer = tokenizer
        self.projection = torch.nn.Parameter(projection, requires_grad=False)
        self.post_layernorm = torch.nn.LayerNorm(ln_weight.shape[0], eps=eps)
        self.post_layernorm.weight.data.copy_(ln_weight)
        self.post_layernorm.bias.data.copy_(ln_bias)
        self.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "ClipTextScorer":
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = Path(path)
        if not path.is_dir():
            raise VTCError(f"CLIP checkpoint '{path}' is not a directory")
        from transformers.utils import logging as hf_logging

        try:
            # A full CLIPModel checkpoint also holds the vision tower: loading only the text side
            # reports every vision weight as unexpected, which is expected here.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                text_model = CLIPTextModelWithProjection.from_pretrained(path, dtype=dtype)
            finally:
                hf_logging.set_verbosity(verbosity)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise VTCError(f"CLIP checkpoint '{path}' could not be loaded as a CLIP model with a tokenizer: {exc}") from exc
        tensors = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key, name in _VISUAL_KEYS.items():
                    if key in f.keys():
                        tensors[name] = f.get_tensor(key).to(dtype)
        missing = [k for k, name in _VISUAL_KEYS.items() if name not in tensors]
        if missing:
            raise VTCError(f"CLIP checkpoint '{path}' lacks {missing}: save the full CLIPModel (both towers)")
        return cls(text_model, tokenizer, eps=text_model.config.layer_norm_eps, **tensors)

    @torch.no_grad()
    def embed_text(self, queries: list[str], spec: TextSpec = TextSpec()) -> torch.Tensor:
        """(B, P) text embeddings, unit length; queries longer than ``spec.max_length`` (or CLIP's context) are truncated.

        ``spec.pooling == "last"`` is the published Recoverable Compression reading: every query padded to
        ``max_length``, the tower run WITHOUT an attention mask, the hidden state at the last position projected.
        ``spec.segments`` reads every query whole (CDPruner's reading, ``segment_embeddings``): the result is
        the mean of its unit segment embeddings, so its dot with a unit patch is the mean of the cosines.
        """
        if spec.segments:
            if spec.pooling != "eos" or spec.max_length is not None:
                raise VTCError("text segments read the whole question at CLIP's context: they take neither "
                               f"pooling={spec.pooling!r} nor max_length={spec.max_length!r}")
            embeds, owner = self.segment_embeddings(queries)
            total = embeds.new_zeros(len(queries), embeds.shape[1]).index_add_(0, owner, embeds)
            return total / torch.bincount(owner, minlength=len(queries)).unsqueeze(1).to(total)
        context = self.text_model.config.max_position_embeddings
        max_len = min(spec.max_length or context, context)
        device = self.projection.device
        if spec.pooling == "last":
            batch = self.tokenizer(queries, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
            hidden = self.text_model(input_ids=batch["input_ids"].to(device)).last_hidden_state[:, -1]
            embeds = self.text_model.text_projection(hidden)
        else:
            batch = self.tokenizer(queries, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            embeds = self.text_model(**batch).text_embeds
        return torch.nn.functional.normalize(embeds, dim=-1)

    @torch.no_grad()
    def segment_embeddings(self, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query tokenised whole and cut into context-long segments, the last one padded with id 0 under
        a zero attention mask, each segment pooled as CLIP pools: (S, P) unit embeddings of all segments and
        (S,) the query each belongs to. CDPruner's reading (its CLIPVisionTower.forward); one tower call."""
        context = self.text_model.config.max_position_embeddings
        ids, masks, owner = [], [], []
        for index, query in enumerate(queries):
            row = torch.tensor(self.tokenizer(query, verbose=False)["input_ids"], dtype=torch.long)
            count = (len(row) - 1) // context + 1  # (L - 1) // C + 1 segments, as the official code counts them
            padded = torch.zeros(count * context, dtype=torch.long)
            padded[: len(row)] = row
            ids.append(padded.view(count, context))
            masks.append((torch.arange(count * context) < len(row)).long().view(count, context))
            owner += [index] * count
        device = self.projection.device
        embeds = self.text_model(input_ids=torch.cat(ids).to(device), attention_mask=torch.cat(masks).to(device)).text_embeds
        return torch.nn.functional.normalize(embeds, dim=-1), torch.tensor(owner, device=device)

    @torch.no_grad()
    def token_embeddings(self, queries: list[str], spec: TextSpec) -> torch.Tensor:
        """(B, M, P) every token's final state through text_projection, unit length, zero at padding: the
        question truncated to ``spec.max_length`` (or CLIP's context), BOS and EOS included (VisionTrim's reading)."""
        if spec.segments or spec.pooling != "eos" or spec.scaled:
            raise VTCError("per-token text scores take neither segments, pooling='last' nor scaled")
        context = self.text_model.config.max_position_embeddings
        max_len = min(spec.max_length or context, context)
        batch = self.tokenizer(queries, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        batch = {k: v.to(self.projection.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        states = self.text_model(**batch).last_hidden_state
        tokens = torch.nn.functional.normalize(self.text_model.text_projection(states), dim=-1)
        return tokens * batch["attention_mask"].unsqueeze(-1).to(tokens)

    @torch.no_grad()
    def similarity(self, patch_states: torch.Tensor, queries: list[str], spec: TextSpec = TextSpec()) -> torch.Tensor:
        """(B, N) cosine similarity of each query with each patch of its image (scaled as ``spec`` says); with
        ``spec.segments`` the mean of the cosines with the query's segments. ``patch_states``: the tower's
        patch states at the layer ``spec.patch_states`` names (the adapter picks them)."""
        if patch_states.shape[-1] != self.post_layernorm.weight.shape[0]:
            raise VTCError(
                f"CLIP checkpoint's vision width {self.post_layernorm.weight.shape[0]} does not match the LLaVA "
                f"vision tower's {patch_states.shape[-1]}: use the CLIP the tower came from"
            )
        states = patch_states.to(self.projection.dtype)
        if spec.post_layernorm:
            states = self.post_layernorm(states)
        patches = states @ self.projection.T
        if spec.per_token:
            return per_token_scores(patches, self.token_embeddings(queries, spec))
        text = self.embed_text(queries, spec)
        sim = torch.einsum("bnp,bp->bn", torch.nn.functional.normalize(patches, dim=-1), text)
        return sim * patches.shape[-1] ** -0.5 if spec.scaled else sim


def per_token_scores(patches: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """TextSpec.per_token's (B, N, 2, W): each patch's vector (B, N, P) and its dots with the (B, M, P) unit
    token embeddings (zero rows for padding), both zero-padded to W = max(P, M)."""
    vectors = patches.float()
    dots = vectors @ tokens.float().transpose(1, 2)
    width = max(vectors.shape[-1], dots.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    return torch.stack([pad(vectors), pad(dots)], dim=2)
