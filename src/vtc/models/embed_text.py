"""A text-to-patch score from the language model's own input embeddings: no second checkpoint.

TEXT_SIM needs the question and every image patch in one space. A LLaVA-style model
already has one: its projector maps each patch into the language model's input space,
where the question's words are rows of the input-embedding table. So the score is the
cosine between the question's token embeddings and each PROJECTED image token (the
projector's output, the very vectors the language model receives). Any family with a
projector and a tokenizer gets it for free (LLaVA-1.5, LLaVA-OneVision, Qwen-VL, ...).

Which question tokens count: the tokenizer's special tokens (BOS, EOS, the image
placeholder, ...) never do; tokens whose text has no letter or digit (punctuation,
bare whitespace pieces) are dropped under ``max_content``. No word list is involved.

Pooling over the question's tokens (``POOLINGS``):
  ``mean``         cosine(mean of the counted tokens' embeddings, patch)
  ``max``          per patch, the highest cosine(token, patch) over the non-special tokens
  ``max_content``  ``max`` over the tokens that contain a letter or digit.
                   A question made only of punctuation falls back to ``max``'s tokens.
  ``max_centred``  ``max_content`` after subtracting, for each token, its mean cosine over the image's
                   patches: a token that matches every patch alike ("the", "what") says nothing about
                   where to look; only how much more it matches one patch than the rest localises.
                   The score is then a contrast in [-2, 2], not a cosine.
                   The default.

Measured on the demo benchmark (scripts/text_source_localisation.py, 300 test questions, 249 of them
about the small object; shipped checkpoint): share of small-target questions whose top-10% patches by
text score touch the answer's cell / accuracy of recoverable at 10% of the tokens:
CLIP text tower 100% / 84.0; mean 6.4% / 34.0; max 63.1% / 59.7; max_content 63.9% / 60.7;
max_centred 83.9% / 71.3 (fastervlm without text: 59.3). Mean pooling is below chance (about 10%): the
question's function words match the background more than the objects and drown the content words.
"""

from __future__ import annotations

import torch

from ..methods.base import TextSpec, VTCError

POOLINGS = ("mean", "max", "max_content", "max_centred")
DEFAULT_POOLING = "max_centred"  # the best localisation and accuracy on the demo benchmark (module docstring)

# TextSpec fields that only describe how CLIP's text tower reads text: this source has no such choice,
# so a non-default value (from recoverable's compat="original" or text_scale="published", say) is refused
# rather than silently ignored. ``source`` is the pipeline's business (it picks the query text) and works here.
_CLIP_ONLY_FIELDS = ("pooling", "max_length", "post_layernorm", "scaled")


class EmbeddingTextScorer:
    """cosine(question tokens in the LM's input-embedding table, projected image tokens), pooled -> (B, N)."""

    reads = "projected"  # the adapter passes the projector's output for the patch tokens

    def __init__(self, embeddings: torch.nn.Embedding, tokenizer, pooling: str = DEFAULT_POOLING):
        if pooling not in POOLINGS:
            raise VTCError(f"text pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.embeddings = embeddings  # the model's own table, shared (not copied)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.special_ids = special_token_ids(tokenizer)
        self._has_content: dict[int, bool] = {}

    @classmethod
    def from_model(cls, model, tokenizer, pooling: str = DEFAULT_POOLING) -> "EmbeddingTextScorer":
        """From a loaded vision-language model (its ``get_input_embeddings()``) and its tokenizer."""
        return cls(model.get_input_embeddings(), tokenizer, pooling)

    @property
    def width(self) -> int:
        return self.embeddings.weight.shape[1]

    # ------------------------------------------------------------------ tokens

    def has_content(self, token_id: int) -> bool:
        """True when the token's text holds a letter or a digit (cached per id)."""
        if token_id not in self._has_content:
            text = self.tokenizer.decode([token_id])
            self._has_content[token_id] = any(ch.isalnum() for ch in text)
        return self._has_content[token_id]

    def counted_ids(self, query: str, index: int = 0) -> list[int]:
        """The ids of ``query``'s tokens that the pooling reads (special tokens never)."""
        ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if i not in self.special_ids]
        if not ids:
            raise VTCError(f"text query {index} ({query!r}) has no token besides special tokens: nothing to score")
        if self.pooling in ("max_content", "max_centred"):
            content = [i for i in ids if self.has_content(i)]
            return content or ids  # only punctuation: every non-special token rather than nothing
        return ids

    # ------------------------------------------------------------------ score

    def check(self, projected: torch.Tensor, queries: list[str], spec: TextSpec) -> None:
        if projected.dim() != 3:
            raise VTCError(f"projected image tokens must be (B, N, D), got shape {tuple(projected.shape)}")
        if projected.shape[-1] != self.width:
            raise VTCError(
                f"projected image tokens have width {projected.shape[-1]} but the language model's input "
                f"embeddings have width {self.width}: pass the projector's output, not the vision features"
            )
        if isinstance(queries, str) or len(queries) != projected.shape[0]:
            count = "a string" if isinstance(queries, str) else len(queries)
            raise VTCError(f"{projected.shape[0]} images but {count} text queries: give one query per image")
        default = TextSpec()
        fields = [f for f in _CLIP_ONLY_FIELDS if not (spec.per_token and f == "post_layernorm")]  # it applies none
        changed = [f"{f}={getattr(spec, f)!r}" for f in fields if getattr(spec, f) != getattr(default, f)]
        if changed:
            raise VTCError(
                f"the LLM-embedding text source cannot honour {', '.join(changed)}: these are CLIP text-tower "
                "readings (e.g. recoverable compat='original' or text_scale='published'); use text_source='clip'"
            )

    @torch.no_grad()
    def similarity(self, projected: torch.Tensor, queries: list[str], spec: TextSpec = TextSpec()) -> torch.Tensor:
        """(B, N) score of each image's patches against its query; ``projected`` (B, N, D) in the LM's input space."""
        self.check(projected, queries, spec)
        rows = [self.counted_ids(q, i) for i, q in enumerate(queries)]
        width = max(len(r) for r in rows)
        device = self.embeddings.weight.device
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        counted = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            counted[b, : len(row)] = True
        words = self.embeddings(ids).float()  # B, T, D
        if spec.per_token:
            from .clip_text import per_token_scores

            unit = torch.nn.functional.normalize(words, dim=-1) * counted[..., None]
            return per_token_scores(projected.to(device), unit)
        patches = torch.nn.functional.normalize(projected.to(device).float(), dim=-1)  # B, N, D
        if self.pooling == "mean":
            total = (words * counted[..., None]).sum(1)  # the mean's direction: the cosine ignores its length
            return torch.einsum("bnd,bd->bn", patches, torch.nn.functional.normalize(total, dim=-1))
        cosine = torch.einsum("bnd,btd->btn", patches, torch.nn.functional.normalize(words, dim=-1))
        if self.pooling == "max_centred":
            cosine = cosine - cosine.mean(-1, keepdim=True)  # each token against its own level on this image
        return cosine.masked_fill(~counted[..., None], -torch.inf).amax(1)


def special_token_ids(tokenizer) -> set[int]:
    """Every id the tokenizer treats as special: its named specials and added tokens flagged special."""
    found = set(tokenizer.all_special_ids)
    found |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    return found
