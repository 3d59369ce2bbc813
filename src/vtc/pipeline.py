"""Compress + generate: images and questions in, answers and per-image provenance out.

>>> pipe = Pipeline.from_pretrained("path/to/llava", clip="path/to/clip")
>>> [r] = pipe(["cat.png"], ["What is on the mat?"], method="recoverable", budget="auto")
>>> r.text, r.tokens_before, r.tokens_after
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .io import check_question, load_image
from .methods import Budget, Method, Selection, TextSpec, VTCError, get
from .models.clip_text import ClipTextScorer
from .models.embed_text import EmbeddingTextScorer
from .models.family import family_for, family_of_model

LLAVA15_PROMPT = "USER: <image>\n{question} ASSISTANT:"
# LLaVA-1.5's evaluation conversation (conv_vicuna_v1, the one its eval scripts use): the system sentence first.
LLAVA15_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA15_EVAL_PROMPT = LLAVA15_SYSTEM + " USER: <image>\n{question} ASSISTANT:"


@dataclass
class Result:
    """One answer with what it cost."""

    text: str
    method: str
    budget: str
    tokens_before: int
    tokens_after: int
    selection: Selection
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "method": self.method,
            "budget": self.budget,
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "provenance": self.selection.counts(),
            **{k: round(v, 3) for k, v in self.timings.items()},
            **({"info": _jsonable(self.selection.info)} if self.selection.info else {}),
        }


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


class _StepClock:
    """A generate() streamer that only records when the prompt and each new token arrive."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        self.stamps.append(time.perf_counter())

    def end(self):
        self.stamps.append(time.perf_counter())


class Pipeline:
    """A vision-language model, its processor, an optional CLIP text scorer, and the compress-then-generate loop.

    The model's family adapter (``models/``) is chosen by its config's ``model_type``.
    """

    def __init__(self, model, processor, text_scorer: ClipTextScorer | EmbeddingTextScorer | None = None):
        self.adapter = family_of_model(model)(model, text_scorer)
        self.model = model.eval()
        self.processor = processor
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokenizer.padding_side = "left"

    @classmethod
    def from_pretrained(
        cls, model_path: str | Path, clip: str | Path | None = None, dtype: torch.dtype | str = "auto", device: str = "auto",
        text_source: str = "clip",
    ) -> "Pipeline":
        """Load a saved checkpoint of a supported family (and a CLIP checkpoint for text-guided methods).

        ``text_source``: where text-guided methods get TEXT_SIM. ``"clip"``: the CLIP text tower of the
        ``clip`` checkpoint (text-guided methods need it). ``"llm"``: the loaded model's own input embeddings
        against its projected image tokens (``EmbeddingTextScorer``); ``clip`` must then be None.

        ``device="auto"``: the CPU for now (see ``resolve_device``); ``"cuda"`` on request, not yet verified.
        ``dtype="auto"``: float16 on CUDA (as the methods' official code runs), float32 on CPU; or a torch
        dtype / its name ("float32", "fp16", ...).
        """
        if text_source not in ("clip", "llm"):
            raise VTCError(f"text_source must be 'clip' or 'llm', got {text_source!r}")
        if text_source == "llm" and clip is not None:
            raise VTCError("text_source='llm' scores text with the model's own embeddings: give no CLIP checkpoint (--clip)")
        place = resolve_device(device)
        dtype = resolve_dtype(dtype, place)
        path = Path(model_path)
        if not path.is_dir():
            raise VTCError(f"model '{model_path}' is not a directory with a saved checkpoint")
        try:
            config_type = _model_type(path)
        except (OSError, ValueError) as exc:
            raise VTCError(f"model '{model_path}': no readable config.json ({exc})") from None
        try:
            family = family_for(config_type)
        except VTCError as exc:
            raise VTCError(f"model '{model_path}': {exc}") from None
        model, processor = family.load(path, dtype, place)
        scorer = ClipTextScorer.from_pretrained(clip, dtype=dtype).to(place) if clip is not None else None
        if text_source == "llm":
            scorer = EmbeddingTextScorer.from_model(model, processor.tokenizer)
        return cls(model, processor, scorer)

    # ------------------------------------------------------------------ inputs

    def prompt(self, question: str) -> str:
        """The checkpoint's chat template around one image and the question (LLaVA-1.5's format if it has none)."""
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return LLAVA15_PROMPT.format(question=question)

    def prepare(self, images: Sequence, questions: Sequence[str]):
        if len(images) != len(questions):
            raise VTCError(f"{len(images)} images but {len(questions)} questions: give one question per image")
        if not images:
            raise VTCError("no images given")
        pil = [load_image(img, name=str(img) if isinstance(img, (str, Path)) else f"image {i}") for i, img in enumerate(images)]
        texts = [self.prompt(self.check_no_special_tokens(check_question(q, i), i)) for i, q in enumerate(questions)]
        return self.processor(images=pil, text=texts, return_tensors="pt", padding=True).to(self.model.device)

    @functools.cached_property
    def special_token_strings(self) -> list[str]:
        """Every special-token string of the processor's tokenizer (the image placeholder included), read once."""
        return self.special_tokens()

    def special_tokens(self) -> list[str]:
        """Every special-token string of the processor's tokenizer (the image placeholder included)."""
        tokenizer = self.processor.tokenizer
        found = set(tokenizer.all_special_tokens)
        found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        image_token = getattr(self.processor, "image_token", None)
        if image_token:
            found.add(image_token)
        return sorted(t for t in found if t)

    def check_no_special_tokens(self, question: str, index: int = 0) -> str:
        """A question is user text: a special-token string in it (a literal '<image>', '</s>', ...) would be
        read as that token, not as text, and break the prompt, so it is refused."""
        for token in self.special_token_strings:
            if token in question:
                raise VTCError(
                    f"question {index} contains {token!r}, a special token of the model's tokenizer; "
                    "remove it (special tokens cannot be part of a question)"
                )
        return question

    # ------------------------------------------------------------------ run

    def __call__(
        self,
        images: Sequence,
        questions: Sequence[str],
        method: str | Method = "recoverable",
        budget: Budget | int | float | str = "auto",
        max_new_tokens: int = 32,
        per_tile: bool = False,
        **method_options,
    ) -> list[Result]:
        inputs = self.prepare(images, questions)
        return self.generate(
            inputs, [q.strip() for q in questions], method, budget, max_new_tokens, per_tile=per_tile, **method_options
        )

    @torch.no_grad()
    def compress(
        self, inputs, questions: Sequence[str], method: Method, budget: Budget, per_tile: bool = False
    ) -> tuple[list[Selection], dict]:
        """Signals + selection for a batch of processor inputs; returns selections and their timings (ms).

        ``per_tile``: on a tiled family (LLaVA-NeXT), split the budget across the base image and the
        tiles in proportion to their tokens and select in each; by default it applies to the whole image.
        """
        text_queries = self.text_queries(questions, method.text) if "text_sim" in method.needs else None
        return self.adapter.compress(inputs, method, budget, text_queries, per_tile=per_tile)

    def text_queries(self, questions: Sequence[str], spec: TextSpec) -> list[str]:
        """The text each image's TEXT_SIM reads: the question, or the first line of LLaVA-1.5's evaluation prompt."""
        if spec.source == "question":
            return list(questions)
        return [self.eval_prompt_first_line(q) for q in questions]

    def eval_prompt_first_line(self, question: str) -> str:
        """Recoverable Compression's published text query (compat='original').

        LLaVA-1.5's evaluation prompt (system sentence included) tokenized as LLaVA's
        ``tokenizer_image_token`` does (each side of the image placeholder on its own, one
        BOS), the placeholder removed, decoded with special tokens kept, cut at the first
        newline. With a LLaMA tokenizer that is "<s> A chat between ... questions. USER:",
        the same for every question.
        """
        tokenizer = self.processor.tokenizer
        first, *rest = [tokenizer(chunk).input_ids for chunk in LLAVA15_EVAL_PROMPT.format(question=question).split("<image>")]
        has_bos = bool(first) and first[0] == tokenizer.bos_token_id
        ids = first + [i for chunk in rest for i in (chunk[1:] if has_bos else chunk)]
        return tokenizer.decode(ids, skip_special_tokens=False).split("\n")[0]

    @torch.no_grad()
    def generate(
        self,
        inputs,
        questions: Sequence[str],
        method: str | Method = "recoverable",
        budget: Budget | int | float | str = "auto",
        max_new_tokens: int = 32,
        per_tile: bool = False,
        **method_options,
    ) -> list[Result]:
        """Compress and generate from ready processor inputs (pixel_values, input_ids, attention_mask).

        ``method`` may chain a vision-side method and an in-LLM one: ``"recoverable>fastv"`` with
        ``budget="auto>64"``; an in-LLM method alone (``"fastv"``) sees all image tokens. A vision-side
        method that carries its own in-LLM stage (``llm_stage``: VScan) runs both from its one budget.
        """
        method, budget, llm_method, llm_budget = resolve(method, budget, method_options)
        if max_new_tokens < 1:
            raise VTCError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        selections, timings = self.compress(inputs, questions, method, budget, per_tile=per_tile)
        before = self.adapter.tokens_before(inputs)
        t0 = time.perf_counter()
        projected = self.adapter.project(selections)
        counts = [p.shape[0] for p in projected]
        input_ids, attention_mask = self.adapter.splice_ids(
            inputs["input_ids"], inputs["attention_mask"], counts, self.pad_token_id, expected=before
        )
        timings["project_ms"] = (time.perf_counter() - t0) * 1e3
        self.check_length(input_ids.shape[1] + max_new_tokens)

        clock = _StepClock()
        pruner = None
        if llm_method is not None:
            from .models.llm_prune import InLLMPruner

            pruner = InLLMPruner(self.adapter.language_model, llm_method, llm_budget, input_ids, attention_mask, self.adapter.image_token_id)
        start = time.perf_counter()
        with pruner if pruner is not None else nullcontext():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                mm_encoder_outputs=self.adapter.image_inputs(projected),
                **self.adapter.generation_inputs(inputs, selections, input_ids, attention_mask),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_token_id,
                streamer=clock,
            )
        timings.update(_generation_times(start, clock.stamps))
        if pruner is not None:
            for b, s in enumerate(selections):
                s.info = {**s.info, "llm_method": llm_method.name, "llm_kept": pruner.kept_counts()[b],
                          "llm_average_tokens": round(pruner.average_tokens[b], 2), **pruner.infos[b]}
        new_tokens = out[:, input_ids.shape[1] :]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        own_stage = llm_method is None or llm_method is getattr(method, "llm_stage", None)
        name = method.name if own_stage else f"{method.name}>{llm_method.name}"
        label = str(budget) if own_stage else f"{budget}>{llm_budget}"
        return [
            Result(t.strip(), name, label, n, k, s, dict(timings))
            for t, s, n, k in zip(texts, selections, before, counts)
        ]

    def check_length(self, total: int) -> None:
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if limit is not None and total > limit:
            raise VTCError(
                f"prompt plus max_new_tokens is {total} tokens, over the language model's {limit}: "
                "shorten the question or lower max_new_tokens"
            )


def resolve(method, budget, options: dict):
    """(vision method, its budget, in-LLM method or None, its budget) from a one-line spec.

    ``"recoverable>fastv"`` + ``"auto>64"``: Recoverable Compression before the LLM, FastV
    keeping 64 of its tokens after layer 2. An in-LLM method alone gets the vision side 'none'.
    Options go to the vision-side method, or to the in-LLM one when it is alone.
    """
    from .methods.llm_base import LLMMethod

    if isinstance(method, str) and ">" in method:
        vision_name, llm_name = (part.strip() for part in method.split(">", 1))
        parts = str(budget).split(">", 1)
        if len(parts) != 2:
            raise VTCError(f"method '{method}' chains two methods: give two budgets, e.g. 'auto>64'")
        llm = get(llm_name)
        if not isinstance(llm, LLMMethod):
            raise VTCError(f"'{llm_name}' acts before the LLM; after '>' give an in-LLM method (fastv, pyramiddrop, sparsevlm, feather, dart)")
        vision = get(vision_name, **options)
        if isinstance(vision, LLMMethod):
            raise VTCError(f"'{vision_name}' is an in-LLM method; before '>' give a vision-side method")
        if getattr(vision, "llm_stage", None) is not None:
            raise VTCError(f"'{vision_name}' already prunes inside the LLM (its own stage); it cannot chain with '{llm_name}'")
        return vision, Budget.parse(parts[0].strip()), llm, Budget.parse(parts[1].strip())
    chosen = get(method, **options)
    if isinstance(chosen, LLMMethod):
        return get("none"), Budget.parse("auto"), chosen, Budget.parse(budget)
    stage = getattr(chosen, "llm_stage", None)  # a vision-side method with its own in-LLM stage (VScan)
    if stage is not None:
        return chosen, Budget.parse(budget), stage, Budget.parse("auto")
    return chosen, Budget.parse(budget), None, None


def _generation_times(start: float, stamps: list[float]) -> dict[str, float]:
    """prefill = start of generate -> first new token; decode = the rest, per token too."""
    # stamps: [prompt put, token 1, token 2, ..., end]
    if len(stamps) < 3:
        return {"prefill_ms": (stamps[-1] - start) * 1e3 if stamps else 0.0, "decode_ms": 0.0}
    first = stamps[1]
    steps = len(stamps) - 3  # new tokens after the first
    decode = stamps[-2] - first
    return {
        "prefill_ms": (first - start) * 1e3,
        "decode_ms": decode * 1e3,
        "decode_ms_per_token": decode * 1e3 / steps if steps else 0.0,
    }


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CPU for now: the methods build their index tensors on the CPU and have not been run on CUDA
    (a CUDA index into a CPU mask fails inside torch), so a GPU machine must not pick CUDA silently.
    An explicit 'cuda' is accepted, at the user's choice."""
    if str(device) == "auto":
        return torch.device("cpu")
    try:
        place = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise VTCError(f"device '{device}' is not a torch device (auto, cpu, cuda, cuda:1, ...): {exc}") from None
    if place.type == "cuda" and not torch.cuda.is_available():
        raise VTCError(f"device '{device}': CUDA is not available here (use 'cpu' or 'auto')")
    return place


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 on CPU; a torch floating dtype or its name as given."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise VTCError(f"dtype {dtype} is not a floating-point type")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise VTCError(f"dtype '{dtype}' is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _model_type(path: Path) -> str:
    import json

    with open(path / "config.json") as f:
        return json.load(f).get("model_type", "unknown")
