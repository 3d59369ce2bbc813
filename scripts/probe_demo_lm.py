"""Can the demo's language model learn the clutter questions at all? It trains alone, on perfect image tokens.

    python scripts/probe_demo_lm.py [--steps 3000] [--qtypes shape_by_color,...] [--layers 3] [--hidden 128]
                                    [--rope-theta 10000] [--turns 1] [--objects-only | --focus-steps N | --stages 8:300,...]
                                    [--eval-every 250] [--out probe_lm.json]

Issue 22's diagnosis so far: the tower's cells carry every attribute the clutter questions ask
(scripts/probe_demo_features.py: 99.9-100%), the projected tokens point at the right words, and still the
LLaVA answers clutter questions at 31-40%. This script removes perception altogether: every image token is
``train.ideal_tokens`` (the sum of the LM's own embeddings of the patch's colour, shape, size and sign words;
background zero; a little noise), the batches are the training script's (``train.make_batch``, minimal pairs as
in training), and only the LM and its head learn, from the demo recipe's initialisation
(``train.build_llava``). Every ``--eval-every`` steps it reports the first answer token's accuracy per question
type on the clutter test split's first 300 questions (teacher-forced, greedy). If the LM does not learn a type
here, no change to the tower, projector or grounding can teach it in that many steps.

``--stages`` runs train.py's staged curriculum (single questions on their answer's cells plus a few other things,
8 -> 16 -> 60 tokens, optionally per question type); evaluations inside a stage also report the accuracy on the
stage's own token count, which tells "not learned" from "learned on few tokens, not carried to all 196".
Use ``--qtypes`` to probe the generator's relational and count types (out of the benchmark's default mix).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import CLIPModel

from vtc.demo import scenes_v2, train
from vtc.demo.evaluate import CHECKPOINT
from vtc.demo.families import vocabulary
from vtc.demo.scenes import COLORS, SHAPES
from vtc.testing import word_tokenizer

WORD_ROWS = (0, 1, 3, 2)  # patch_targets' rows: colour, shape, sign word, size
N = scenes_v2.GRID * scenes_v2.GRID


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", type=Path, default=CHECKPOINT / "clip",
                        help="a CLIP folder: only its vision config is used (the LLaVA's shape)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--qtypes", default=",".join(q for q, w in zip(scenes_v2.QTYPES, scenes_v2.QTYPE_WEIGHTS) if w),
                        help=f"clutter question types to train and test on (any of {', '.join(scenes_v2.QTYPES)}; "
                             "default: the benchmark's mix)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--turns", type=int, default=1, help="questions per sequence (as train.py --turns)")
    parser.add_argument("--images", type=int, default=4000, help="clutter training scenes")
    parser.add_argument("--test", type=int, default=300, help="clutter test questions per evaluation")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--objects-only", action="store_true",
                        help="train on the tokens of labelled patches only (no background; evaluation keeps all)")
    parser.add_argument("--focus-steps", type=int, default=0,
                        help="train.py's curriculum: the first N steps show the small shapes' and signs' cells plus random "
                             "others, --focus-start tokens growing to all (evaluation keeps all)")
    parser.add_argument("--focus-start", type=int, default=16)
    parser.add_argument("--stages", default="", help="train.py's --stages curriculum (tokens:steps,...; evaluation "
                                                       "also reports accuracy at the stage's tokens)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the accuracy curve here (JSON)")
    args = parser.parse_args(argv)
    qtypes = args.qtypes.split(",")
    unknown = sorted(set(qtypes) - set(scenes_v2.QTYPES))
    if unknown:
        parser.error(f"--qtypes: unknown {unknown}; the clutter types are {', '.join(scenes_v2.QTYPES)}")
    if min(args.steps, args.eval_every, args.batch, args.images, args.test, args.turns) < 1:
        parser.error("--steps, --eval-every, --batch, --turns, --images and --test must be at least 1")
    try:
        args.stages = train.parse_stages(args.stages)
    except ValueError as err:
        parser.error(f"--stages: {err}")
    if sum(bool(v) for v in (args.objects_only, args.focus_steps, args.stages)) > 1:
        parser.error("--objects-only, --focus-steps and --stages are ways of shortening the image: use one")
    if sum(stage.steps for stage in args.stages) > args.steps:
        parser.error("--stages: their steps exceed --steps")
    if not 0 <= args.focus_steps <= args.steps:
        parser.error(f"--focus-steps must lie in [0, --steps], got {args.focus_steps}")
    args.qtypes = qtypes
    return args


class Probe:
    def __init__(self, args):
        self.args = args
        self.stage = None  # the curriculum stage of the current training step (its image-token count)
        self.rng = random.Random(args.seed)
        self.gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        self.tokenizer = word_tokenizer(words=vocabulary(("basic", "clutter")))
        clip = CLIPModel.from_pretrained(args.clip)
        self.llava = train.build_llava(clip, self.tokenizer, layers=args.layers, hidden=args.hidden, rope_theta=args.rope_theta)
        names = (COLORS, SHAPES, scenes_v2.WORDS, ("big", "small"))
        self.word_ids = [self.tokenizer.convert_tokens_to_ids(list(n)) for n in names]
        seeds = scenes_v2.split_seeds("train")
        self.items = [scenes_v2.make_scene(random.Random(seeds[500_000 + i])).items for i in range(args.images)]
        self.labels = [train.patch_targets(items, True)[0] for items in self.items]
        seeds = list(scenes_v2.split_seeds("test"))[: args.test]  # the requested types in turn, so each is evaluated
        self.test = [scenes_v2.make_sample(s, args.qtypes[k % len(args.qtypes)]) for k, s in enumerate(seeds)]
        self.test_labels = [train.patch_targets(s.objects, True)[0] for s in self.test]

    def tokens(self, labels, objects_only: bool = False):
        embed = self.llava.model.language_model.embed_tokens.weight

        def of(i):
            tokens = train.ideal_tokens(embed, labels[i], self.word_ids, WORD_ROWS, self.args.noise, self.gen)
            return tokens[(labels[i] > 0).any(0)] if objects_only else tokens

        return of

    def batch(self, pairs, labels, objects_only: bool = False, shown=None):
        none = torch.zeros(len(labels), N, 1)  # no features: the tokens stand in
        return train.make_batch(self.llava, self.tokenizer, none, pairs, None, False, self.gen,
                                self.tokens(labels, objects_only), shown=shown)

    def shown_by(self, step: int, items):
        """make_batch's ``shown`` at a training step (or, step None, for evaluation at the last stage's size)."""
        stage = train.stage_at(step, self.args.stages) if step is not None else self.stage
        context = None
        if step is not None and step < self.args.focus_steps:
            context = train.focus_context(step, self.args.focus_steps, self.args.focus_start, N)
        return train.curriculum_shown(items, N, self.gen, stage, context)

    def draw(self, single: bool = False):
        """One image's questions: a question (or minimal pair) per turn; with several turns, one conversation of the
        first questions and one of the twins, as train.py's vqa_conversations (``single``: one turn, as in a
        curriculum stage)."""
        i = self.rng.randrange(len(self.items))
        draws = [self.questions(i) for _ in range(1 if single else self.args.turns)]
        return draws[0] if self.args.turns == 1 else train.conversations(i, draws)

    def questions(self, i):
        """(image, question, answer, answer cells) of one question, or of a minimal pair, as training draws them."""
        qtype = self.rng.choice(self.stage.qtypes if self.stage is not None and self.stage.qtypes else self.args.qtypes)
        if qtype in train.CLUTTER_CONTRAST:
            questions = train.clutter_contrast_questions(self.items[i], qtype, self.rng)
        else:
            questions = [scenes_v2.make_question(self.items[i], qtype, self.rng)]
        return [(i, q, a, train.item_cells(self.items[i], targets)) for q, a, targets in questions]

    @torch.no_grad()
    def evaluate(self, at_stage: bool = False) -> dict[str, float]:
        """First-answer-token accuracy per type on the test questions, on every token (or, ``at_stage``, on the
        current curriculum stage's tokens)."""
        self.llava.eval()
        right, total = collections.Counter(), collections.Counter()
        shown = self.shown_by(None, [s.objects for s in self.test]) if at_stage else None
        for start in range(0, len(self.test), 50):
            chunk = range(start, min(start + 50, len(self.test)))
            pairs = [(j, self.test[j].question, self.test[j].answer, self.test[j].answer_cells) for j in chunk]
            x, mask, y, _ = self.batch(pairs, self.test_labels, shown=shown)
            out = self.llava.model.language_model(inputs_embeds=x, attention_mask=mask)
            logits = self.llava.lm_head(out.last_hidden_state)
            for row, j in enumerate(chunk):
                first = int((y[row] != -100).nonzero()[0, 0])  # the answer's first token
                qtype = self.test[j].qtype
                right[qtype] += int(logits[row, first - 1].argmax() == y[row, first])
                total[qtype] += 1
        self.llava.train()
        return {q: round(100 * right[q] / total[q], 1) for q in self.args.qtypes if total[q]}

    def run(self, console: Console) -> list[dict]:
        lm, head = self.llava.model.language_model, self.llava.lm_head
        params = list(lm.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        sched = train.warmup_cosine(opt, self.args.steps, 0.05)
        curve, start = [], time.perf_counter()
        self.llava.train()
        for step in range(self.args.steps):
            self.stage = train.stage_at(step, self.args.stages)
            pairs = []
            while len(pairs) < self.args.batch:
                pairs.extend(self.draw(single=self.stage is not None))
            x, mask, y, _ = self.batch(pairs[: self.args.batch], self.labels, self.args.objects_only,
                                       self.shown_by(step, self.items))
            loss, _ = train.lm_loss(self.llava, x, mask, y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if (step + 1) % self.args.eval_every == 0 or step + 1 == self.args.steps:
                point = {"step": step + 1, "seconds": round(time.perf_counter() - start), "loss": round(loss.item(), 3),
                         "accuracy": self.evaluate()}
                if self.stage is not None:
                    point.update(stage_tokens=self.stage.tokens, accuracy_at_stage=self.evaluate(at_stage=True))
                curve.append(point)
                console.log(point)
        return curve


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    curve = Probe(args).run(console)
    if args.out:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "curve": curve}
        args.out.write_text(json.dumps(report, indent=2))
    return curve


if __name__ == "__main__":
    main()
