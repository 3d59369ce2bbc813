"""ToMe's two building blocks, shared by the after-tower ToMe (tome.py), ToMe inside the tower (tome_tower.py)
and the in-tower hook's merges (models/tower_loop.py): bipartite soft matching and the size-weighted average.

Written from the ToMe paper (Bolya et al., ICLR 2023, arXiv 2210.09461, Sec. 3); the official code
(facebookresearch/ToMe) is CC-BY-NC 4.0 and none of it is copied here.
"""

from __future__ import annotations

from typing import Literal

import torch


def bipartite_match(
    metric: torch.Tensor, r: int, protect_first: bool = False, unmerged: Literal["similarity", "position"] = "similarity"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching on a (B, t, Dm) batch: which r tokens of set A merge into which of set B.

    A = positions 0, 2, 4, ...; B = positions 1, 3, 5, .... Every A-token's edge goes to its most similar
    B-token (cosine of the metric); the r A-tokens with the most similar edges merge (equal similarities:
    the lower position first). ``protect_first``: the first token (a CLS) never merges.
    Returns (src, dst, unm), indices within A and B: ``src`` (B, r) the merging A-tokens, ``dst`` (B, r)
    the B-token each goes into, ``unm`` (B, |A| - r) the A-tokens that stay, by descending similarity
    (``unmerged="similarity"``) or in their order in the sequence (``"position"``: a protected first token
    stays first)."""
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
    best, best_b = scores.max(dim=-1)
    if protect_first:
        best[:, 0] = -torch.inf
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src, unm = order[:, :r], order[:, r:]
    if unmerged == "position":
        unm = unm.sort(dim=-1).values
    return src, best_b.gather(1, src), unm


def merge_rows(
    v: torch.Tensor, size_b: torch.Tensor, flat_dst: torch.Tensor, weighted_a: torch.Tensor, new_size: torch.Tensor
) -> torch.Tensor:
    """x_b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a) for every row b of every image (float32 sums).

    ``v`` (B, nb, D) the receiving rows and ``size_b`` (B, nb) their sizes; ``flat_dst`` (B*r,) the flat row
    (image * nb + row) each merging token goes into; ``weighted_a`` (B, r, D) the merging tokens times their
    sizes; ``new_size`` (B, nb) the sizes after the merge."""
    bsz, nb, d = v.shape
    total = (v.float() * size_b[..., None]).reshape(bsz * nb, d).index_add_(0, flat_dst, weighted_a.reshape(-1, d))
    return (total.reshape(bsz, nb, d) / new_size[..., None]).to(v.dtype)
