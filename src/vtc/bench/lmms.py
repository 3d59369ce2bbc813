"""lmms-eval bridge (optional extra ``vtc[lmms]``): evaluate any vtc method with lmms-eval's tasks.

    pip install "visual-token-compression[lmms]"
    vtc lmms-task vtc-lmms-task                      # the synthetic benchmark as an offline lmms-eval task
    python -m lmms_eval --model vtc --model_args method=recoverable,budget=20 \\
        --tasks vtc_synthetic --include_path vtc-lmms-task --batch_size 8

lmms-eval finds the ``vtc`` model through the ``lmms_eval.models`` entry point that vtc's
package declares (``manifest`` below), so the command works in any process once vtc is
installed. ``--model_args`` (comma-separated ``key=value``):

  pretrained   checkpoint directory (default: the shipped demo model, with its CLIP)
  clip         CLIP checkpoint with the text tower, for text-guided methods
  method       a vtc method or chain: recoverable, fastervlm+text, recoverable>fastv, ...
  budget       20, 0.111, auto; chains take two: auto>64
  dtype        auto, float32, float16, bfloat16;  device: auto, cpu, cuda
  batch_size   requests per generate call (or lmms-eval's --batch_size)
  per_tile     true: tiled families (LLaVA-NeXT) split the budget per tile
  any other    an option of the method (e.g. compat=original for recoverable)

Everything but loading the model and reading lmms-eval's request objects lives here and does
not import lmms-eval; the lmms-eval class is in ``lmms_model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..methods.base import VTCError

INSTALL_HINT = 'the lmms-eval bridge needs lmms-eval: pip install "visual-token-compression[lmms]"'
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class BridgeOptions:
    """What ``--model_args`` asked for, checked."""

    pretrained: Path | None = None  # None: the shipped demo model
    clip: Path | None = None
    method: str = "recoverable"
    budget: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    per_tile: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)
    text_source: str = "clip"  # "llm": the model's own embeddings score the text (no CLIP checkpoint)


def _batch_size(value) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise VTCError(f"batch_size {value!r}: give a whole number of at least 1 (the bridge has no 'auto')")
    return int(text)


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise VTCError(f"{name}={value!r}: give true or false")


def merge_model_args(model_args: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """``--model_args`` plus what lmms-eval adds from its own flags (batch_size, device, max_batch_size).

    lmms-eval always passes ``batch_size`` (1 unless --batch_size is given), so a batch_size in
    ``--model_args`` wins over that default; two different explicit values are refused.
    """
    merged = dict(model_args)
    for key, value in cli.items():
        if value is None or key == "max_batch_size":  # the bridge batches exactly batch_size requests
            continue
        if key not in merged:
            merged[key] = value
        elif str(merged[key]) != str(value) and not (key == "batch_size" and str(value) == "1"):
            raise VTCError(f"{key} is given twice with different values: {merged[key]!r} in --model_args, {value!r} by lmms-eval's --{key}")
    return merged


def bridge_options(pretrained=None, clip=None, method="recoverable", budget="auto", dtype="auto", device="auto",
                   batch_size=1, per_tile=False, text_source="clip", **method_options) -> BridgeOptions:
    """Check ``--model_args`` before any model loads: names, chains, budgets and method options fail here."""
    from ..pipeline import resolve

    options = BridgeOptions(
        pretrained=Path(str(pretrained)).expanduser() if pretrained not in (None, "") else None,
        clip=Path(str(clip)).expanduser() if clip not in (None, "") else None,
        method=str(method).strip(),
        budget=str(budget).strip(),
        dtype=str(dtype),
        device=str(device),
        batch_size=_batch_size(batch_size),
        per_tile=_flag("per_tile", per_tile),
        text_source=str(text_source).strip(),
        method_options=dict(method_options),
    )
    if options.text_source not in ("clip", "llm"):
        raise VTCError(f"text_source must be 'clip' or 'llm', got {options.text_source!r}")
    resolve(options.method, options.budget, options.method_options)  # unknown method, option, chain or budget
    return options


def load_pipeline(options: BridgeOptions):
    """The pipeline ``options`` name; no ``pretrained``: the shipped demo model and its CLIP, as ``vtc bench``."""
    from ..pipeline import Pipeline

    model, clip = options.pretrained, options.clip
    if model is None:
        from ..demo.evaluate import CHECKPOINT

        model = CHECKPOINT / "llava"
        clip = clip or (CHECKPOINT / "clip" if options.text_source == "clip" else None)
    return Pipeline.from_pretrained(model, clip=clip, dtype=options.dtype, device=options.device, text_source=options.text_source)


def _generation(gen_kwargs: dict | None) -> tuple[int, tuple[str, ...]]:
    """(max_new_tokens, stop strings) of one request; sampling and beam search are refused (vtc decodes greedily)."""
    kwargs = dict(gen_kwargs or {})
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0 or int(kwargs.get("num_beams") or 1) > 1:
        raise VTCError(f"the task asks for sampling or beam search ({kwargs}); vtc's bridge decodes greedily, as vtc bench does")
    until = kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    return int(kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), until


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The answer up to its first stop string, as lmms-eval's models return it."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


Images = Sequence[Any] | Callable[[], Sequence[Any]]


def answer_requests(pipe, options: BridgeOptions, items: Iterable[tuple[str, dict, Images]], on_batch=None) -> list[str]:
    """(context, gen_kwargs, images or a function returning them) per request -> answers, in request order.

    Requests with the same generation settings are answered ``options.batch_size`` at a time, in
    their order (images are loaded one batch at a time); vtc's batched generation gives each
    request the answer it gets alone. One image per prompt.
    """
    items = list(items)
    groups: dict[tuple, list[int]] = {}
    for i, (_, gen_kwargs, _) in enumerate(items):
        groups.setdefault(_generation(gen_kwargs), []).append(i)
    answers: list[str | None] = [None] * len(items)
    for (max_new, until), indices in groups.items():
        for start in range(0, len(indices), options.batch_size):
            chunk = indices[start : start + options.batch_size]
            images = [_one_image(items[i][2], i) for i in chunk]
            results = pipe(images, [items[i][0] for i in chunk], method=options.method, budget=options.budget,
                           max_new_tokens=max_new, per_tile=options.per_tile, **options.method_options)
            for i, result in zip(chunk, results):
                answers[i] = cut_at_stops(result.text, until)
            if on_batch is not None:
                on_batch(len(chunk))
    return answers


def _one_image(images: Images, index: int):
    visuals = images() if callable(images) else images
    visuals = list(visuals or [])
    if len(visuals) != 1:
        raise VTCError(f"request {index}: vtc's bridge answers prompts with exactly one image, got {len(visuals)}")
    return visuals[0]


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's model id ``vtc`` and the class that serves it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtc", simple_class_path="vtc.bench.lmms_model.VtcLmms")


def register():
    """Register ``vtc`` in this process's lmms-eval registry (the entry point does it for an installed vtc;
    this serves a source checkout on PYTHONPATH). Returns the model class; a clear error without lmms-eval."""
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError:
        raise VTCError(INSTALL_HINT) from None
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    from .lmms_model import VtcLmms

    return VtcLmms
