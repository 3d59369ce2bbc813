"""Score a pipeline on the synthetic benchmark: accuracy per method, per question type, on small targets.

Each scene family (families.py) is scored on its own test split; a checkpoint trained on the basic family only
has no words for the clutter questions, so ``checkpoint_families`` reads which families its tokenizer covers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import FAMILIES, family_module, make_sample, split_seeds

CHECKPOINT = Path(__file__).parent / "checkpoint"


def test_samples(limit: int, family: str = "basic"):
    seeds = split_seeds(family, "test")
    return [make_sample(family, seeds[i]) for i in range(limit)]


def checkpoint_families(pipe) -> tuple[str, ...]:
    """The families whose question and answer words the pipeline's tokenizer holds (the others come out <unk>)."""
    return families_of_vocab(pipe.processor.tokenizer.get_vocab())


def families_of_vocab(vocab) -> tuple[str, ...]:
    return tuple(f for f in FAMILIES if all(w in vocab for w in getattr(family_module(f), "EXTRA_VOCAB", ())))


def saved_families(checkpoint: Path) -> tuple[str, ...]:
    """``checkpoint_families`` of a saved demo checkpoint, from its tokenizer file (basic when there is none)."""
    import json

    path = Path(checkpoint) / "llava" / "tokenizer.json"
    return families_of_vocab(json.loads(path.read_text())["model"]["vocab"]) if path.is_file() else ("basic",)


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(" .?!").split(" ")[0] if text.strip() else ""


@dataclass
class Score:
    """Accumulated results of one method at one budget."""

    correct: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    by_qtype: dict = field(default_factory=lambda: defaultdict(list))
    small: list[bool] = field(default_factory=list)

    def add(self, sample, result) -> None:
        ok = normalise(result.text) == sample.answer
        self.correct.append(ok)
        self.tokens.append(result.tokens_after)
        self.by_qtype[sample.qtype].append(ok)
        if sample.small_target:
            self.small.append(ok)

    def summary(self) -> dict:
        mean = lambda xs: 100.0 * sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        return {
            "accuracy": round(mean(self.correct), 1),
            "small_target_accuracy": round(mean(self.small), 1),
            "mean_tokens": round(sum(self.tokens) / max(1, len(self.tokens)), 1),
            "by_qtype": {k: round(mean(v), 1) for k, v in sorted(self.by_qtype.items())},
            "prefill_ms": round(sum(self.prefill_ms) / max(1, len(self.prefill_ms)), 2),
            "n": len(self.correct),
        }


def run_method(pipe, samples, method, budget, batch_size=16, progress=None, task=None, keep=None) -> Score:
    """Answer every sample with one method/budget; ``keep`` collects (sample, result) pairs for pictures."""
    score = Score()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        results = pipe([s.image for s in chunk], [s.question for s in chunk], method=method, budget=budget, max_new_tokens=3)
        score.prefill_ms.append(results[0].timings["prefill_ms"] / len(chunk))
        for s, r in zip(chunk, results):
            score.add(s, r)
            if keep is not None:
                keep.append((s, r))
        if progress is not None:
            progress.update(task, advance=len(chunk))
    return score


@torch.no_grad()
def localisation_hit_rate(pipe, samples, top_fraction: float = 0.10) -> float:
    """Share of small-target questions whose top-10% patches by text score touch the answer's cells."""
    from ..methods import AttentionSpec, Signal

    small = [s for s in samples if s.small_target]
    hits = 0
    for i in range(0, len(small), 32):
        chunk = small[i : i + 32]
        inputs = pipe.prepare([s.image for s in chunk], [s.question for s in chunk])
        sig = pipe.adapter.signals(
            inputs["pixel_values"], frozenset({Signal.FEATURES, Signal.TEXT_SIM}), AttentionSpec(), [s.question for s in chunk]
        )
        k = max(1, round(top_fraction * sig.num_patches))
        top = sig.text_sim.topk(k, dim=-1).indices
        for s, row in zip(chunk, top.tolist()):
            hits += bool(set(row) & set(s.answer_cells))
    return 100.0 * hits / max(1, len(small))


def evaluate_checkpoint(path: Path = CHECKPOINT, limit: int = 500, families=None) -> dict:
    """Full-token accuracy and text-to-patch localisation of a trained demo checkpoint, per family.

    The basic family's numbers stay at the top level (as in the first checkpoint's report); every other family
    the checkpoint covers gets its own entry with the same two keys.
    """
    from ..pipeline import Pipeline

    pipe = Pipeline.from_pretrained(Path(path) / "llava", clip=Path(path) / "clip")
    report = {}
    for family in families or checkpoint_families(pipe):
        samples = test_samples(limit, family)
        full = run_method(pipe, samples, "none", "auto").summary()
        scores = {"full_token": full, "localisation_hit_rate": round(localisation_hit_rate(pipe, samples), 1)}
        if family == "basic":
            report.update(scores)
        else:
            report[family] = scores
    return report
