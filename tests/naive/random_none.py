"""FROZEN naive reference (the per-image code before batching, issue 21); tests compare the batched method with it.

Reference points every comparison needs: all tokens, a random subset, and spatial average pooling."""

from __future__ import annotations

import torch

from vtc.methods.base import Budget, Method, Origin, Selection, Signals, VTCError, register



class NoCompression(Method):
    """All N patch tokens, untouched (the full-token baseline).

    Budget: only 'auto', a ratio of 1.0 or a count of N can be honoured; any
    smaller budget is an error rather than a silent full-token run.
    """

    supports_auto = True
    paper = "full-token baseline"

    def check_budget(self, budget: Budget, n: int) -> None:
        if not budget.is_auto and budget.tokens(n) != n:
            raise VTCError(f"method 'none' keeps all {n} tokens; give budget 'auto' (or {n}), not {budget}")

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        n = signals.num_patches
        return Selection.build(signals.features[0], torch.arange(n))



class RandomKeep(Method):
    """A uniformly random subset of the patches, kept in raster order.

    Seeded (``seed``, default 0) so runs are reproducible; image b of a batch uses
    seed + b. UniPruneBench found this a surprisingly strong baseline.
    """

    paper = "baseline (UniPruneBench, arXiv:2511.02650)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select_one(self, signals: Signals, budget: Budget) -> Selection:
        n = signals.num_patches
        generator = torch.Generator().manual_seed(self.seed + signals.index)
        kept = torch.randperm(n, generator=generator)[: budget.tokens(n)].sort().values
        return Selection.build(signals.features[0], kept)
