"""FROZEN naive reference (issue 21): the per-image code of vtc.methods.primitives as it was before vectorising.

Do not edit: tests/test_vectorised_equal.py checks the batched implementation against it.
"""


from __future__ import annotations

import torch


def top_in_raster_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, sorted back into raster order (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def cosine_distance_matrix(x: torch.Tensor) -> torch.Tensor:
    """(N, N) 1 - cos(x_i, x_j). The one place methods that need token-token distances build N x N."""
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    return (1.0 - unit @ unit.T).clamp_(min=0.0)


def greedy_max_min(distance: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy max-min diversity: start from ``first``, then add the point farthest from the chosen set.

    ``distance`` (N, N). Keeps a running (N,) vector of each point's distance to the set,
    updated with one row per pick: O(k N) after the distance matrix. Ties go to the lower index.
    Returns the picks in pick order.
    """
    picks = torch.empty(k, dtype=torch.long)
    picks[0] = first
    nearest = distance[first].clone()
    nearest[first] = -1.0
    for i in range(1, k):
        best = int(nearest.argmax())
        picks[i] = best
        nearest = torch.minimum(nearest, distance[best])  # earlier picks stay at -1
        nearest[best] = -1.0
    return picks


def greedy_max_sum(distance: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy max-sum diversity: start from ``first``, then add the point with the largest summed distance to the set."""
    picks = torch.empty(k, dtype=torch.long)
    picks[0] = first
    total = distance[first].clone()
    chosen = torch.zeros(distance.shape[0], dtype=torch.bool)
    chosen[first] = True
    for i in range(1, k):
        best = int(total.masked_fill(chosen, -float("inf")).argmax())
        picks[i] = best
        chosen[best] = True
        total += distance[best]
    return picks
