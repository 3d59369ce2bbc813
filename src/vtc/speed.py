"""`vtc speed`: wall-clock savings of every method on a real 7B model shape (random weights).

Shapes (``SHAPES``): LLaVA-1.5-7B (one 336 px image, 576 tokens); LLaVA-NeXT-7B (a 672x672 image:
base crop + 2x2 tiles, 576 + 2304 = 2880 candidate tokens and 48 newline rows, 2928 image tokens,
the count LlavaNextProcessor writes for it); LLaVA-OneVision-7B (SigLIP-so400m + Qwen2-7B, the same
672x672 picture: base crop + 2x2 tiles of 384 px, 729 + 2916 = 3645 candidates and 54 newline rows,
3699 image tokens, 28 decoder layers); Qwen2.5-VL-7B (a 1024x1024 image, resized by the image processor's
smart_resize to 1036x1036: 74x74 patches through the window-attention tower, merged 2x2 into 37x37 = 1369
tokens, 28 decoder layers; here the tower is a large share of the prefill). ``cost_only`` rows (``cost_rows``, CLI ``--cost-only``) need no
model: FLOPs, KV cache, GPU estimate and the selection alone. The bench drives
the model through its family adapter (``compress``, ``project``, ``splice_ids``, ``tokens_before``,
``language_model``), so the same code times every family; budgets count candidate tokens (a 10%
budget keeps 288 of NeXT's 2880), and the tokens a row reports are what the LLM sees, newlines included.

For each method and budget, in one process, interleaved with the full-token run and
repeated: the vision tower (with the method's signal extraction), the method's own
selection, the projector, the LLM prefill, the time per decoded token, the KV-cache
bytes and the peak memory of the prefill. ``llm_layers`` builds fewer decoder layers
than the shape's (32 for Llama-7B, 28 for Qwen2-7B); decoder layers are timed one by one
(forward hooks), and the full-depth figures are extrapolated as (measured prefill - measured
layers) + mean layer time x depth. Every extrapolated figure says so (the ``*_32_layers``
keys keep their names for every shape; the depth is in the meta).

Qwen2.5-VL: the tower (and its stock merger on every token: vtc reads the merger's output as a
signal) runs in full on every row, the merger runs again on the K tokens sent; the cost model
charges the merger once, on the K tokens, as LLaVA's projector. The tower's time and FLOPs are
reported apart from the LLM's (``tower_side_ms``, ``vision_tflops``; the CLI's "Vision tower and
LLM apart" table): at 10% of Qwen2.5-VL-7B's 1369 tokens the LLM side shrinks 7.4x in FLOPs, the
whole prefill 2.7x. Methods a family's adapter does not serve are skipped with its reason.

Next to the CPU wall clock, each vision-side method's own selection is timed per image at
batch 1, 16 and 64 on random signals of the model's real shape (``selection_ms_per_image``),
and every request's prefill is estimated on a GPU from its FLOPs (``cost.gpu_request_ms``:
A100 bf16 peak at a stated utilisation), so the selection's cost reads against the time a
GPU user would wait for the prefill, not against a slow CPU tower.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .cost import A100_BF16_TFLOPS, PREFILL_UTILISATION, Shape, gpu_request_ms, is_native, request_cost, staged_cost
from .methods import Budget, Method, Signal, Signals, VTCError, get
from .models.family import family_of_model
from .shapes import (NEXT_IMAGE, QWEN_IMAGE, build_llava15, build_llava_next, build_onevision, build_qwen25vl, clip_text_scorer_vit_l,
                     llava15_config, llava_next_config, onevision_config, qwen25vl_config, qwen_patch_grid)

FULL_DEPTH = 32  # LLaVA-1.5's and LLaVA-NeXT's Llama-7B; a bench uses its shape's depth
SHAPES = {"llava-1.5-7b": "LLaVA-1.5-7B", "llava-next-7b": "LLaVA-NeXT-7B", "llava-onevision-7b": "LLaVA-OneVision-7B",
          "qwen2.5-vl-7b": "Qwen2.5-VL-7B"}
_CONFIGS = {"llava-1.5-7b": llava15_config, "llava-next-7b": llava_next_config, "llava-onevision-7b": onevision_config,
            "qwen2.5-vl-7b": qwen25vl_config}
_BUILDERS = {"llava-1.5-7b": build_llava15, "llava-next-7b": build_llava_next, "llava-onevision-7b": build_onevision,
             "qwen2.5-vl-7b": build_qwen25vl}
_IMAGES = {"llava-1.5-7b": None, "llava-next-7b": NEXT_IMAGE, "llava-onevision-7b": NEXT_IMAGE, "qwen2.5-vl-7b": QWEN_IMAGE}
QUESTION = "what is the color of the small triangle left of the red car ?"
SELECT_BATCHES = (1, 16, 64)  # batch sizes the selection is timed at
SELECT_THREADS = 1  # torch threads while a selection is timed on the CPU (comparable across machines)
NOT_A_SELECTION = ("none", "downsample")  # no selection to time: all tokens; a smaller tower forward


@dataclass
class Sample:
    """One timed run of one method at one budget (milliseconds, bytes)."""

    tower_ms: float  # the stock vision tower forward (LLaVA pays it with or without compression)
    signals_ms: float  # our tower run, including the method's signal extraction
    select_ms: float
    project_ms: float
    prefill_ms: float
    layers_ms: list[float]  # each built decoder layer's share of prefill_ms
    decode_ms_per_token: float
    decode_layers_ms: list[float]  # each built layer's share of one decoded token
    kv_bytes: int
    peak_bytes: int
    tokens: float  # image tokens sent to the LLM, newlines included (in-LLM methods: averaged over the layers)
    newlines: int = 0  # of those, layout tokens the projector does not make (LLaVA-NeXT's newline rows)
    tower_layer_tokens: list | None = None  # an in-tower method: tokens per tower layer (attention, MLP); None: all


@dataclass
class Row:
    """The samples of one method at one budget; ``stages`` is an in-LLM method's full-depth plan, (layer, tokens kept)."""

    method: str
    budget: str
    samples: list[Sample] = field(default_factory=list)
    stages: list[tuple[int, int]] = field(default_factory=list)
    select_ms_per_image: dict[int, float] = field(default_factory=dict)  # batch size -> median ms per image
    llm_input: int | None = None  # image tokens entering the LLM before its stages (None: all; VScan: its vision stage's)

    def stage_depths(self, depth: int = FULL_DEPTH) -> list[int] | None:
        """How many of the ``depth`` layers each stage spans (None: one stage, no pruning inside the LLM)."""
        if not self.stages:
            return None
        bounds = [0] + [layer for layer, _ in self.stages] + [depth]
        return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


class _LayerClock:
    """Wall time spent inside each decoder layer (forward pre/post hooks; registered after any pruning hook,
    so a method's scoring at a stage counts outside the layers and is not multiplied by the extrapolation)."""

    def __init__(self, layers):
        self.times, self._start, self._handles = [0.0] * len(layers), 0.0, []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post(i)))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, i):
        def hook(module, args, output):
            self.times[i] += time.perf_counter() - self._start

        return hook

    def take_ms(self) -> list[float]:
        out, self.times = [t * 1e3 for t in self.times], [0.0] * len(self.times)
        return out

    def remove(self):
        for h in self._handles:
            h.remove()


@contextmanager
def peak_memory(device: torch.device):
    """Peak extra memory of the block: CUDA allocator peak, or sampled process RSS on CPU."""
    box = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield box
        box["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, stop = rss(), threading.Event()
    peak = [base]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box["peak"] = max(0, max(peak[0], rss()) - base)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the selection alone, per image


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (as torch's CUDA caching allocator does) rather
    than unmapping every block over 32 MB at free; returns False where that is not possible (no glibc).

    Without it, each new large CPU temporary (a (16, 576, 1024) float tensor is 38 MB) is fresh
    memory whose first touch page-faults: writing it costs ~3.5 ns per float here, 5x a reused
    block, so a CPU timing of selection mostly measured the kernel's page zeroing, a cost a GPU
    user never sees. Process-wide and irreversible: call it only in a benchmark process."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise VTCError(f"--shape '{shape}' is not one of {', '.join(SHAPES)}")


def full_depth(shape: str) -> int:
    """Decoder layers of the named model (Llama-7B 32, Qwen2-7B 28): the depth timings are extrapolated to."""
    check_shape(shape)
    return _CONFIGS[shape]().text_config.num_hidden_layers


def default_image(shape: str) -> tuple[int, int] | None:
    """The picture a shape times (672x672: LLaVA-NeXT's base + 2x2 tiles; 1024x1024 for Qwen2.5-VL's native
    resolution); None for one-grid LLaVA-1.5."""
    check_shape(shape)
    return _IMAGES[shape]


def model_cost_shape(shape: str, image_size: tuple[int, int] | None = None) -> Shape:
    """The full-depth cost Shape of a named model on one image: crops and canvas from its family adapter's
    own layout, on a weightless (meta-device) model, so no 7B model is built; a native-resolution model's
    patch grid from its image processor's resize rule (``shapes.qwen_patch_grid``)."""
    check_shape(shape)
    config = _CONFIGS[shape]()
    image_size = image_size or default_image(shape)
    if is_native(config):
        v = config.vision_config
        return Shape.from_config(config, patch_grid=qwen_patch_grid(tuple(image_size), v.patch_size, v.spatial_merge_size))
    full = Shape.from_config(config)
    if image_size is None:
        return full
    import transformers

    from .models.family import family_for

    family = family_for(config.model_type)
    with torch.device("meta"):
        model = getattr(transformers, family.model_class)(config)
    layout = family(model).layout(tuple(image_size))
    return replace(full, crops=layout.crops, canvas=tuple(layout.canvas.shape))


def shape_family(shape: str):
    """The family adapter class that serves the named shape's model (its methods' support and refusals)."""
    from .models.family import family_for

    check_shape(shape)
    return family_for(_CONFIGS[shape]().model_type)


def times_selection(method) -> bool:
    """True for methods whose selection is timed alone: vision-side, not 'none' or 'downsample', not in-tower
    (whose work is inside the tower's forward)."""
    in_model = getattr(method, "in_llm", False) or getattr(method, "in_tower", False)
    return not in_model and method.name not in NOT_A_SELECTION


def random_signals(method, shape: Shape, batch: int, seed: int = 0, device="cpu") -> Signals:
    """Random signals of the model's real shape for ``batch`` images, only those ``method.needs``.

    Selection cost depends on shapes, not values: features are the candidates' (vision width, or a merged
    tower's merge group of patches side by side: ``Shape.feature_width``), keys vision-width (head-averaged:
    vision_width // vision_heads), projected tokens LLM-width, attention rows softmax-like and positive.
    """
    g = torch.Generator().manual_seed(seed)
    n, d = shape.num_candidates, shape.vision_width
    keys_dim = d // shape.vision_heads if method.attention.keys == "head_mean" else d
    make = {
        Signal.CLS_ATTN: lambda: torch.randn(batch, n, generator=g).mul(2).softmax(-1),
        Signal.KEYS: lambda: torch.randn(batch, n, keys_dim, generator=g),
        Signal.TEXT_SIM: lambda: per_token_text(batch, n, shape, g) if method.text.per_token else torch.rand(batch, n, generator=g) * 0.3,
        Signal.PROJECTED: lambda: torch.randn(batch, n, shape.llm_width, generator=g),
        Signal.RECEIVED_ATTN: lambda: torch.rand(batch, n, generator=g) / n,
        Signal.CLS_FEATURE: lambda: torch.randn(batch, d, generator=g),
        Signal.CLS_ATTN_SHALLOW: lambda: torch.randn(batch, n, generator=g).mul(2).softmax(-1),
    }
    present = {name: make[name]().to(device) for name in make if name in method.needs}
    features = torch.randn(batch, n, shape.feature_width, generator=g)
    return Signals(features=features.to(device), grid=shape.candidate_grid, **present)


CLIP_PROJECTION = 768  # CLIP ViT-L/14's projection width (the text space of the CLIP scorer)
QUESTION_TOKENS = 16  # a typical question's token count


def per_token_text(batch: int, n: int, shape: Shape, g: torch.Generator) -> torch.Tensor:
    """TextSpec.per_token's (B, N, 2, W): patch vectors in the text space (CLIP's projection, or the LLM width on
    towers without CLS, which only the LLM-embedding source serves) and their dots with the question's tokens."""
    width = CLIP_PROJECTION if shape.cls_tokens else shape.llm_width
    vectors = torch.randn(batch, n, width, generator=g)
    dots = torch.nn.functional.pad(torch.randn(batch, n, QUESTION_TOKENS, generator=g), (0, width - QUESTION_TOKENS))
    return torch.stack([vectors, dots], dim=2)


@dataclass
class SelectionTiming:
    """Median selection time per image at each batch size, and the mean tokens kept per image."""

    ms_per_image: dict[int, float]
    tokens: float


def selection_ms_per_image(
    method, budget, shape: Shape, batches=SELECT_BATCHES, reps: int = 5, device="cpu", threads: int | None = SELECT_THREADS
) -> SelectionTiming:
    """Time ``method.select`` alone on random real-shape signals (``random_signals``), per image.

    Per batch size: one warm-up call (it also runs the once-per-Signals finiteness check, which
    the pipeline pays where signals are made, not per selection), then ``reps`` timed calls on the
    same signals; the median divided by the batch size. ``tokens`` is the mean output count of the
    warm-up at the first batch size (what an 'auto' budget chose on these signals). On the CPU, torch
    runs on ``threads`` threads meanwhile (default one, as scripts/bench_selection.py: numbers that
    compare across tools and machines; the caller's setting is restored after; None leaves it).
    """
    if not times_selection(method):
        raise VTCError(f"'{method.name}' has no selection of its own to time (in-LLM, 'none' or 'downsample')")
    if reps < 1 or not batches or min(batches) < 1:
        raise VTCError(f"selection timing needs reps >= 1 and batch sizes >= 1, got reps={reps}, batches={list(batches)}")
    device = torch.device(device)
    budget = Budget.parse(budget)
    with torch_threads(threads if device.type == "cpu" else None):
        return _selection_timing(method, budget, shape, batches, reps, device)


@contextmanager
def torch_threads(count: int | None):
    """Run the block with torch on ``count`` intra-op threads (None: as it is), then restore the setting."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _selection_timing(method, budget: Budget, shape: Shape, batches, reps: int, device: torch.device) -> SelectionTiming:
    out, tokens = {}, None
    for batch in batches:
        signals = random_signals(method, shape, batch, device=device)
        with torch.no_grad():
            warm = method.select(signals, budget)
            if tokens is None:
                tokens = sum(sel.num_tokens for sel in warm) / len(warm)
            times = []
            for _ in range(reps):
                _sync(device)
                start = time.perf_counter()
                method.select(signals, budget)
                _sync(device)
                times.append(_ms(start))
        out[batch] = statistics.median(times) / batch
        del signals, warm
    return SelectionTiming(out, tokens)


class SpeedBench:
    """The model, inputs and timers of one `vtc speed` run, driven through the model's family adapter."""

    def __init__(
        self, llm_layers: int = 2, text_tokens: int = 64, decode_tokens: int = 8, device: str = "auto", model=None, text_scorer=None,
        shape: str = "llava-1.5-7b", image_size: tuple[int, int] | None = None,
    ):
        """``model`` / ``text_scorer`` default to ``shape`` built with ``llm_layers`` decoder layers (tests pass tiny ones).

        ``image_size`` (height, width): the picture a tiled family splits into crops, or a native-resolution family
        (Qwen-VL) resizes to its own patch grid; default the shape's picture for a built 7B shape (``default_image``);
        for a model passed in, twice the tower's crop each way (tiled), or the picture whose patch grid is the 7B
        shape's (74 x 74 patches of the model's own size: Qwen-VL)."""
        check_shape(shape)
        if text_tokens < 2:
            raise VTCError(f"--text-tokens must be at least 2, got {text_tokens}")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.full_depth = full_depth(shape)
        if model is None:
            self._check_layers(llm_layers, self.full_depth)
            model = _BUILDERS[shape](llm_layers, self.dtype)
            image_size = image_size or default_image(shape)
        self.model = model.to(self.device)
        scorer = text_scorer if text_scorer is not None else self._default_text_scorer()
        if isinstance(scorer, torch.nn.Module):
            scorer = scorer.to(self.device, self.dtype)
        self.adapter = family_of_model(self.model)(self.model, scorer)
        self.layers = self.adapter.language_model.layers
        self.llm_layers, self.decode_tokens, self.text_tokens = len(self.layers), decode_tokens, text_tokens
        self.shape_name = shape
        g = torch.Generator().manual_seed(0)  # pixels, then the text ids
        self.picture: tuple[int, int] | None = None
        self.inputs = self._image_inputs(image_size, g)
        self.tokens_before = self.adapter.tokens_before(self.inputs)  # what the stock processor writes for this image
        self.image_tokens = self.tokens_before[0]
        self.shape = self._cost_shape()
        self._check_layers(self.llm_layers, self.shape.llm_layers)
        image_id = self.model.config.image_token_id
        vocab = self.model.config.text_config.vocab_size
        text = torch.randint(2, min(vocab, image_id), (text_tokens,), generator=g)
        image = torch.full((self.image_tokens,), image_id)
        half = text_tokens // 3  # system prompt before the image, question after it
        self.inputs["input_ids"] = torch.cat([text[:half], image, text[half:]])[None].to(self.device)
        self.inputs["attention_mask"] = torch.ones_like(self.inputs["input_ids"])
        self.skipped: list[str] = []
        self.stage_plans: dict[tuple[str, str], list[tuple[int, int]]] = {}  # in-LLM (method, budget) -> full-depth stages
        self.stage_inputs: dict[tuple[str, str], int] = {}  # (method, budget) -> image tokens entering the LLM

    def _default_text_scorer(self):
        """CLIP-L's text tower where the vision tower is CLIP; the language model's own input embeddings (with
        a small word tokenizer for the question) where it is not (SigLIP: CLIP's text space does not apply)."""
        if self.model.config.vision_config.model_type.startswith("clip"):
            return clip_text_scorer_vit_l()
        from .models.embed_text import EmbeddingTextScorer
        from .testing import word_tokenizer

        return EmbeddingTextScorer.from_model(self.model, word_tokenizer())

    @staticmethod
    def _check_layers(built: int, depth: int) -> None:
        if not 1 <= built <= depth:
            raise VTCError(f"--llm-layers must be between 1 and {depth}, got {built}")

    @property
    def depth(self) -> int:
        """Decoder layers of the full model the timings are extrapolated to."""
        return self.shape.llm_layers

    def _image_inputs(self, image_size, g: torch.Generator) -> dict:
        """Random pixels of one image as the family's processor shapes them (tiled: every crop, and the image size;
        native resolution: its patches flattened, and their grid)."""
        if is_native(self.model.config):
            return self._native_inputs(image_size, g)
        size = self.adapter.tower.config.image_size
        if not self.adapter.tiled:
            pixels = torch.randn(1, 3, size, size, generator=g)
            return {"pixel_values": pixels.to(self.device, self.dtype), "input_ids": torch.zeros(1, 1, dtype=torch.long)}
        image_size = tuple(image_size or (2 * size, 2 * size))
        crops = self.adapter.layout(image_size).crops
        pixels = torch.randn(1, crops, 3, size, size, generator=g)
        return {"pixel_values": pixels.to(self.device, self.dtype), "image_sizes": torch.tensor([image_size], device=self.device),
                "input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def _native_inputs(self, image_size, g: torch.Generator) -> dict:
        """Qwen-VL: the processor's (patches, 3 x frames x p x p) rows for an image resized by its smart_resize."""
        v = self.model.config.vision_config
        p, merge = v.patch_size, v.spatial_merge_size
        self.picture = tuple(image_size or (74 * p, 74 * p))  # (height, width) before the processor's resize
        rows, cols = qwen_patch_grid(self.picture, p, merge)
        pixels = torch.randn(rows * cols, 3 * v.temporal_patch_size * p * p, generator=g)
        return {"pixel_values": pixels.to(self.device, self.dtype), "image_grid_thw": torch.tensor([[1, rows, cols]], device=self.device),
                "input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def _cost_shape(self) -> Shape:
        """The full-depth cost-model shape of this model and image (a tiled family: its crops and canvas;
        a native-resolution one: its patch grid)."""
        if is_native(self.model.config):
            grid = tuple(int(x) for x in self.inputs["image_grid_thw"][0, 1:])
            return Shape.from_config(self.model.config, llm_layers=self.full_depth, patch_grid=grid)
        shape = Shape.from_config(self.model.config, llm_layers=self.full_depth)
        if not self.adapter.tiled:
            return shape
        layout = self.adapter.layouts(self.inputs)[0]
        return replace(shape, crops=layout.crops, canvas=tuple(layout.canvas.shape))

    def stock_tower(self) -> None:
        """The stock model's vision-tower forward on every crop of the image (what it pays with or without compression)."""
        pixels = self.inputs["pixel_values"]
        if "image_grid_thw" in self.inputs:  # Qwen-VL: the tower and its merger on the image's patches
            self.adapter.tower(pixels, grid_thw=self.inputs["image_grid_thw"])
            return
        self.adapter.tower(pixels.flatten(0, 1) if pixels.dim() == 5 else pixels, output_hidden_states=True)

    @torch.no_grad()
    def run_once(self, method, budget: Budget, time_tower: bool = False) -> Sample:
        """One timed request. ``method`` is a vision-side Method, or an in-LLM method run on all image tokens.

        ``time_tower`` also times the stock vision-tower forward (the reference for a method's own overhead).
        """
        d = self.device
        in_llm = getattr(method, "in_llm", False)
        vision = get("none") if in_llm else method
        vision_budget = Budget.parse("auto") if in_llm else budget
        tower = float("nan")
        if time_tower:
            _sync(d)
            t = time.perf_counter()
            self.stock_tower()
            _sync(d)
            tower = _ms(t)

        queries = [QUESTION] if Signal.TEXT_SIM in vision.needs else None
        selections, timings = self.adapter.compress(self.inputs, vision, vision_budget, queries)
        _sync(d)
        t = time.perf_counter()
        projected = self.adapter.project(selections)
        counts = [p.shape[0] for p in projected]
        ids, mask = self.adapter.splice_ids(self.inputs["input_ids"], self.inputs["attention_mask"], counts, 0, expected=self.tokens_before)
        positions = self.adapter.generation_inputs(self.inputs, selections, ids, mask)  # Qwen-VL: the kept tokens' M-RoPE rows
        _sync(d)
        project_ms = _ms(t)
        newlines = int((selections[0].info or {}).get("newline_tokens", 0))

        pruner, tokens = None, float(counts[0])
        if in_llm:
            pruner, tokens = self._pruner(method, budget, ids, mask)
        elif getattr(method, "llm_stage", None) is not None:  # a vision-side method with its own in-LLM stage (VScan)
            pruner, tokens = self._pruner(method.llm_stage, Budget.parse("auto"), ids, mask, n=counts[0], key=(method.name, str(budget)))
        clock = _LayerClock(self.layers)
        try:
            with pruner if pruner is not None else nullcontext():
                with peak_memory(d) as peak:
                    t = time.perf_counter()
                    out = self.model(
                        input_ids=ids, attention_mask=mask, mm_encoder_outputs=self.adapter.image_inputs(projected),
                        use_cache=True, logits_to_keep=1, **positions,
                    )
                    _sync(d)
                    prefill_ms = _ms(t)
                layers_ms = clock.take_ms()
                cache = out.cache
                kv_bytes = _cache_bytes(cache)
                token = out.logits[:, -1:].argmax(-1)
                step_position = positions.get("position_ids")
                t = time.perf_counter()
                for _ in range(self.decode_tokens):
                    mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                    extra = {}
                    if step_position is not None:  # Qwen-VL: each new token one past the last (text row and t, h, w)
                        step_position = step_position[..., -1:] + 1
                        extra = {"position_ids": step_position}
                    step = self.model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra)
                    cache, token = step.cache, step.logits[:, -1:].argmax(-1)
                _sync(d)
                decode = _ms(t) / self.decode_tokens
                decode_layers = [x / self.decode_tokens for x in clock.take_ms()]
        finally:
            clock.remove()
        return Sample(tower, timings["signals_ms"], timings["select_ms"], project_ms, prefill_ms, layers_ms, decode, decode_layers,
                      kv_bytes, peak["peak"], tokens, newlines, (selections[0].info or {}).get("tower_layer_tokens"))

    def in_llm_plan(self, method, budget: Budget, n: int | None = None) -> list:
        """The in-LLM method's full-depth plan on ``n`` image tokens (default all of this image's); refused when
        its stages need more built layers."""
        plan = method.plan(self.image_tokens if n is None else n, self.depth, budget)
        if len(plan) + 1 > self.llm_layers:
            raise VTCError(f"{method.name} prunes in {len(plan)} stages: build at least {len(plan) + 1} decoder layers (--llm-layers)")
        return plan

    def _pruner(self, method, budget: Budget, ids, mask, n: int | None = None, key: tuple[str, str] | None = None):
        """The in-LLM method's full-depth plan, replayed on the built layers 1..S (one built layer per stage).
        ``n``: the image tokens entering the LLM (default all); ``key``: the row its stages are recorded under."""
        from .methods.llm_base import PlanOverride, average_tokens
        from .models.llm_prune import InLLMPruner

        n = self.image_tokens if n is None else n
        plan = self.in_llm_plan(method, budget, n)
        replay = PlanOverride(method, [st.keep for st in plan])
        pruner = InLLMPruner(self.adapter.language_model, replay, Budget.parse(1.0), ids, mask, self.adapter.image_token_id)
        self.stage_plans[key or (method.name, str(budget))] = [(st.layer, st.keep) for st in plan]
        self.stage_inputs[key or (method.name, str(budget))] = n
        return pruner, average_tokens(plan, n, self.depth)


def to_full_depth(measured_ms: float, layers_ms, stage_depths: list[int] | None = None, depth: int = FULL_DEPTH) -> float:
    """Extrapolate a timing with a few built decoder layers to the full model's ``depth`` (Llama-7B's 32).

    Vision-side methods: every layer sees the same tokens, so the mean layer time x depth.
    In-LLM methods (``stage_depths``: how many of the layers each stage spans): built layer s
    runs stage s, the last stage runs on all remaining built layers; each stage's mean layer
    time is multiplied by its depth in the full-depth plan.
    """
    layers_ms = list(layers_ms)
    outside = measured_ms - sum(layers_ms)
    if not stage_depths:
        return outside + sum(layers_ms) / len(layers_ms) * depth
    last = len(stage_depths) - 1
    groups = [[t] for t in layers_ms[:last]] + [layers_ms[last:]]
    return outside + sum(depth * sum(g) / len(g) for depth, g in zip(stage_depths, groups))


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def summarise(bench: SpeedBench, rows: list[Row]) -> list[dict]:
    """The summary of one `vtc speed` run (see ``summarise_rows``)."""
    return summarise_rows(rows, bench.shape, bench.text_tokens)


def summarise_rows(
    rows: list[Row], shape: Shape, text_tokens: int, tflops: float = A100_BF16_TFLOPS, utilisation: float = PREFILL_UTILISATION
) -> list[dict]:
    """Medians (and spread) per method/budget, extrapolated to the full depth, next to the analytical FLOPs ratio.

    A pure function of the measured samples: ``rows[0]`` is the full-token run ('none', whose
    samples carry the stock tower time); ``shape`` is the full-depth model the costs are for.
    End-to-end prefill = our tower run + selection + projector + the full-depth LLM prefill; a
    method's own overhead = its tower run minus the stock tower, plus its selection.

    GPU columns: the request's prefill estimated from its FLOPs at ``tflops`` x ``utilisation``
    (``cost.gpu_request_ms``; default an A100 in bf16 at 50%): ``gpu_prefill_ms`` = vision tower +
    projector + LLM prefill at this row's tokens, ``gpu_prefill_ms_full`` the same at all N tokens.
    ``select_ms_per_image`` (batch size -> ms, as a string key) is the row's selection timed alone
    (``selection_ms_per_image``; empty for rows without one), and ``select_share_of_gpu_prefill``
    each of those over ``gpu_prefill_ms``.

    Tower and LLM apart (the tower is a large share on Qwen2.5-VL's native-resolution images):
    ``tower_side_ms`` = our tower run + selection, ``llm_side_ms`` = projector + full-depth LLM prefill,
    ``tower_share`` = tower side / end-to-end prefill; ``llm_speedup`` = the full-token row's LLM side over
    this row's, against ``llm_flops_ratio`` (projector + LLM prefill FLOPs, full over this row's);
    ``vision_tflops`` / ``llm_tflops`` = the two sides' FLOPs.
    """
    med = statistics.median
    full = rows[0]
    if full.method != "none":
        raise VTCError(f"the first speed row must be the full-token run 'none', got '{full.method}'")

    depth = shape.llm_layers

    def prefill_32(s: Sample, row: Row) -> float:
        return to_full_depth(s.prefill_ms, s.layers_ms, row.stage_depths(depth), depth)

    def decode_32(s: Sample, row: Row) -> float:
        return to_full_depth(s.decode_ms_per_token, s.decode_layers_ms, row.stage_depths(depth), depth)

    def tower_side(s: Sample) -> float:
        return s.signals_ms + s.select_ms

    def llm_side(s: Sample, row: Row) -> float:
        return s.project_ms + prefill_32(s, row)

    def e2e(s: Sample, row: Row) -> float:
        return tower_side(s) + llm_side(s, row)

    full_e2e = med(e2e(s, full) for s in full.samples)
    full_llm = med(llm_side(s, full) for s in full.samples)
    stock_tower = med(s.tower_ms for s in full.samples)
    full_tokens = int(full.samples[0].tokens)
    full_projected = full_tokens - full.samples[0].newlines
    full_cost = request_cost(shape, full_tokens, text_tokens, projected_tokens=full_projected)
    full_flops = full_cost["total_prefill_flops"]
    full_llm_flops = _llm_flops(full_cost)
    gpu_full = gpu_request_ms(full_cost, tflops, utilisation)["prefill_ms"]
    out = []
    for row in rows:
        s = row.samples
        tokens = med(x.tokens for x in s)
        e2e_all = [e2e(x, row) for x in s]
        own = [x.signals_ms - stock_tower + x.select_ms for x in s]  # what the method adds to the stock tower
        newlines = med(x.newlines for x in s)
        cost = request_cost(shape, round(tokens), text_tokens, projected_tokens=round(tokens - newlines),
                            tower_layer_tokens=s[0].tower_layer_tokens)  # in-tower: every run shrinks the tower alike
        if row.stages:  # in-LLM: the LLM prefill sees N image tokens (VScan: its vision stage's) until the first stage
            entering = row.llm_input or full_tokens
            cost = staged_cost(shape, entering, row.stages, text_tokens,
                               projected_tokens=full_projected if row.llm_input is None else round(entering - newlines))
        speedup = full_e2e / med(e2e_all)
        flops_ratio = full_flops / cost["total_prefill_flops"]
        llm_ms = med(llm_side(x, row) for x in s)
        gpu = gpu_request_ms(cost, tflops, utilisation)
        select_each = sorted(row.select_ms_per_image.items())
        out.append(
            {
                "method": row.method,
                "budget": row.budget,
                "tokens": tokens,
                "newline_tokens": newlines,
                "tower_ms": round(stock_tower, 1),
                "signals_ms": round(med(x.signals_ms for x in s), 1),
                "select_ms": round(med(x.select_ms for x in s), 2),
                "project_ms": round(med(x.project_ms for x in s), 2),
                "prefill_ms_measured": round(med(x.prefill_ms for x in s), 1),
                "prefill_ms_32_layers": round(med(prefill_32(x, row) for x in s), 1),
                "e2e_prefill_ms_32_layers": round(med(e2e_all), 1),
                "e2e_spread_ms": round(max(e2e_all) - min(e2e_all), 1),
                "decode_ms_per_token_32_layers": round(med(decode_32(x, row) for x in s), 1),
                "stages": list(row.stages),
                "kv_bytes_measured": int(med(x.kv_bytes for x in s)),
                "kv_bytes_32_layers_fp16": int(cost["kv_cache_bytes"]),
                "peak_prefill_bytes": int(med(x.peak_bytes for x in s)),
                "method_overhead_ms": round(med(own), 1),
                "overhead_share_of_full_prefill": round(med(own) / full_e2e, 4),
                "speedup": round(speedup, 3),
                "flops_ratio": round(flops_ratio, 3),
                "speedup_vs_flops": round(speedup / flops_ratio, 3),
                "tower_side_ms": round(med(tower_side(x) for x in s), 1),
                "llm_side_ms": round(llm_ms, 1),
                "tower_share": round(med(tower_side(x) for x in s) / med(e2e_all), 4),
                "llm_speedup": round(full_llm / llm_ms, 3),
                "llm_flops_ratio": round(full_llm_flops / _llm_flops(cost), 3),
                "vision_tflops": round(cost["vision_flops"] / 1e12, 3),
                "llm_tflops": round(_llm_flops(cost) / 1e12, 3),
                "select_ms_per_image": {str(b): round(ms, 3) for b, ms in select_each},
                "gpu_vision_ms": round(gpu["vision_ms"], 2),
                "gpu_llm_prefill_ms": round(gpu["llm_prefill_ms"], 2),
                "gpu_prefill_ms": round(gpu["prefill_ms"], 2),
                "gpu_prefill_ms_full": round(gpu_full, 2),
                "select_share_of_gpu_prefill": {str(b): round(ms / gpu["prefill_ms"], 4) for b, ms in select_each},
            }
        )
    return out


def _llm_flops(cost: dict) -> float:
    """The LLM side of a request's prefill FLOPs: projector (Qwen-VL: merger) + LLM prefill."""
    return cost["projector_flops"] + cost["prefill_flops"]


def run_speed(
    methods: list[str], budgets: list[str], llm_layers: int, reps: int, text_tokens: int, decode_tokens: int, progress=None, bench=None,
    select_batches=SELECT_BATCHES, shape: str = "llava-1.5-7b",
) -> tuple[SpeedBench, list[dict]]:
    """Measure every (method, budget) against full tokens, interleaved, ``reps`` times; then each vision-side
    method's selection alone, per image at each of ``select_batches`` (at least 5 timed calls per size).

    A method the family's adapter does not serve (``Family.support``: downsample on tiles or a native grid,
    VisionZip's CLS token on SigLIP or Qwen-VL) is listed in ``bench.skipped`` with the adapter's reason; on a
    tiled family a spatial method (pool) runs per tile, which the random-signal selection timing does not
    model, so its selection is not timed alone (also listed)."""
    bench = bench or SpeedBench(llm_layers, text_tokens, decode_tokens, shape=shape)
    from .methods.llm_base import budget_for_average

    plan = [("none", Budget.parse("auto"))]
    for name in methods:
        method = get(name)
        for b in budgets:
            budget = Budget.parse(b)
            if budget.is_auto and not method.supports_auto:
                continue
            served, why = bench.adapter.support(method)
            if not served:
                bench.skipped.append(f"{name}@{b}: not supported on {bench.adapter.name}: {why}")
                continue
            if getattr(method, "in_llm", False) and not budget.is_auto:  # papers compare in-LLM methods by layer average
                try:
                    budget = budget_for_average(method, budget.tokens(bench.image_tokens), bench.image_tokens, bench.depth)
                except VTCError as exc:
                    bench.skipped.append(f"{name}@{b}: {exc}")
                    continue
            if getattr(method, "in_llm", False):
                bench.in_llm_plan(method, budget)  # too few built layers: refused before anything is timed
            plan.append((name, budget))
    instances = {name: get(name) for name, _ in plan}
    rows = [Row(name, str(b)) for name, b in plan]
    bench.run_once(instances["none"], plan[0][1])  # warm-up
    task = progress.add_task("speed", total=reps * len(plan)) if progress else None
    for _ in range(reps):
        for row, (name, budget) in zip(rows, plan):
            row.samples.append(bench.run_once(instances[name], budget, time_tower=name == "none"))
            if progress:
                progress.update(task, advance=1, description=f"speed {name}@{budget}")
    for row in rows:
        row.stages = bench.stage_plans.get((row.method, row.budget), [])
        if row.stages and bench.stage_inputs.get((row.method, row.budget)) != bench.image_tokens:
            row.llm_input = bench.stage_inputs[(row.method, row.budget)]
    timed = [(row, budget) for row, (name, budget) in zip(rows, plan) if times_selection(instances[name])]
    if bench.shape.crops > 1:
        for row, _ in [(r, b) for r, b in timed if instances[r.method].spatial]:
            bench.skipped.append(f"{row.method}@{row.budget}: selection not timed alone (it runs per tile on a tiled image)")
        timed = [(r, b) for r, b in timed if not instances[r.method].spatial]
    task = progress.add_task("selection", total=len(timed)) if progress and timed else None
    for row, budget in timed:
        timing = selection_ms_per_image(instances[row.method], budget, bench.shape, select_batches, max(5, reps), bench.device)
        row.select_ms_per_image = timing.ms_per_image
        if progress:
            progress.update(task, advance=1, description=f"selection {row.method}@{budget}")
    return bench, summarise(bench, rows)


def flops_curve(shape: Shape, text_tokens: int, points: int = 60) -> list[list[float]]:
    """[tokens, full-token prefill FLOPs / prefill FLOPs at that many image tokens], from 5% of the image's
    tokens to all of them: the analytical curve a speed plot draws its measured points against.
    Every token is counted as projected (a tiled image's few newline rows are not, a <2% difference)."""
    full = request_cost(shape, shape.image_tokens, text_tokens)["total_prefill_flops"]
    low = max(1, shape.image_tokens // 20)
    counts = sorted({round(low + (shape.image_tokens - low) * i / (points - 1)) for i in range(points)})
    return [[t, full / request_cost(shape, t, text_tokens)["total_prefill_flops"]] for t in counts]


def speed_plot(
    results: list[dict], path: Path, title: str = "LLaVA-1.5-7B", depth: int = FULL_DEPTH, curve: list | None = None
) -> None:
    """Speed-up vs tokens kept, one marker set per method, with the analytical FLOPs-ratio curve
    (``curve``: ``flops_curve``'s points; without it, the rows' own FLOPs ratios joined by lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    flops = curve or sorted({(r["tokens"], r["flops_ratio"]) for r in results})
    ax.plot([t for t, _ in flops], [f for _, f in flops], "k--", label="analytical FLOPs ratio")
    for name in dict.fromkeys(r["method"] for r in results if r["method"] != "none"):
        pts = sorted((r["tokens"], r["speedup"]) for r in results if r["method"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, alpha=0.8)
    ax.set_xlabel("image tokens sent to the LLM")
    full = next((r["tokens"] for r in results if r["method"] == "none"), 576)
    ax.set_ylabel(f"end-to-end prefill speed-up vs {full:.0f} tokens")
    ax.set_title(f"{title} shape ({depth} LLM layers, extrapolated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    speed_plot(results, out / "speed.png", SHAPES.get(meta.get("shape"), "LLaVA-1.5-7B"), meta.get("extrapolated_to_layers", FULL_DEPTH),
               meta.get("flops_curve"))


# ----------------------------------------------------------------------------- a shape without a bench: FLOPs and selection


def newline_rows(selection, shape: Shape) -> int:
    """Newline tokens a tiled family adds after ``selection``: one per canvas row that kept a single-source token
    (kept or recovered; merged tokens go after the rows), as LLaVA-NeXT's adapter arranges them."""
    if shape.crops == 1:
        return 0
    from .methods.base import Origin

    single = (selection.origin == Origin.KEPT) | (selection.origin == Origin.RECOVERED)
    starts = selection.source_sizes.cumsum(0) - selection.source_sizes
    position = selection.source_index[starts[single]]
    canvas = position[position >= shape.num_patches] - shape.num_patches
    return int((canvas // shape.canvas[1]).unique().numel())


def cost_rows(
    methods: list[str], budgets: list[str], shape: Shape, text_tokens: int, select_batches=SELECT_BATCHES, reps: int = 5,
    tflops: float = A100_BF16_TFLOPS, utilisation: float = PREFILL_UTILISATION, family=None,
) -> tuple[list[dict], list[str]]:
    """FLOPs, KV cache, estimated GPU prefill and the selection timed alone for every (method, budget), with no model.

    The model is never built (``vtc speed --cost-only``). Tokens kept come from the method's own
    selection on random signals of the shape (all candidates ranked together on a tiled shape), plus the
    newline rows they leave (``newline_rows``); in-LLM methods from their plan on all image tokens. Methods
    with no selection to time other than 'none', spatial methods on a tiled shape, and methods ``family`` (the
    model's adapter class, ``shape_family``) does not serve, are listed as skipped.
    Returns (rows, skipped); row keys as ``summarise_rows``'s cost and selection keys, 'none' first:
    ``vision_tflops`` (the tower, at full size in every row) apart from ``llm_tflops`` (projector
    + LLM prefill), and ``llm_flops_ratio`` (the LLM side's ratio alone) next to ``flops_ratio``.
    """
    from .methods.llm_base import average_tokens, budget_for_average

    full_cost = request_cost(shape, shape.image_tokens, text_tokens, projected_tokens=shape.num_candidates)
    gpu_full = gpu_request_ms(full_cost, tflops, utilisation)["prefill_ms"]
    skipped: list[str] = []

    def row(name, budget, tokens, newlines, cost, stages=(), select=None):
        gpu = gpu_request_ms(cost, tflops, utilisation)
        each = sorted((select or {}).items())
        return {
            "method": name, "budget": str(budget), "tokens": tokens, "newline_tokens": newlines, "stages": list(stages),
            "flops_ratio": round(full_cost["total_prefill_flops"] / cost["total_prefill_flops"], 3),
            "llm_flops_ratio": round(_llm_flops(full_cost) / _llm_flops(cost), 3),
            "total_prefill_tflops": round(cost["total_prefill_flops"] / 1e12, 3),
            "vision_tflops": round(cost["vision_flops"] / 1e12, 3), "llm_tflops": round(_llm_flops(cost) / 1e12, 3),
            "kv_bytes_32_layers_fp16": int(cost["kv_cache_bytes"]),
            "select_ms_per_image": {str(b): round(ms, 3) for b, ms in each},
            "gpu_vision_ms": round(gpu["vision_ms"], 2), "gpu_llm_prefill_ms": round(gpu["llm_prefill_ms"], 2),
            "gpu_prefill_ms": round(gpu["prefill_ms"], 2), "gpu_prefill_ms_full": round(gpu_full, 2),
            "select_share_of_gpu_prefill": {str(b): round(ms / gpu["prefill_ms"], 4) for b, ms in each},
        }

    out = [row("none", "auto", float(shape.image_tokens), shape.newlines, full_cost)]
    for name in methods:
        method = get(name)
        for b in budgets:
            budget = Budget.parse(b)
            label = f"{name}@{b}"
            if budget.is_auto and not method.supports_auto:
                continue
            served, why = family.support(method) if family is not None else (True, "")
            if not served:
                skipped.append(f"{label}: not supported on {family.name}: {why}")
            elif getattr(method, "in_llm", False):
                n = shape.image_tokens
                if not budget.is_auto:
                    try:  # as run_speed: a layer average below what the method's early layers already see is skipped
                        budget = budget_for_average(method, budget.tokens(n), n, shape.llm_layers)
                    except VTCError as exc:
                        skipped.append(f"{label}: {exc}")
                        continue
                plan = method.plan(n, shape.llm_layers, budget)
                stages = [(st.layer, st.keep) for st in plan]
                cost = staged_cost(shape, n, stages, text_tokens, projected_tokens=shape.num_candidates)
                out.append(row(name, budget, average_tokens(plan, n, shape.llm_layers), shape.newlines, cost, stages))
            elif getattr(method, "in_tower", False):
                skipped.append(f"{label}: its tower FLOPs follow the tokens each tower layer keeps; time it without --cost-only")
            elif not times_selection(method) or (shape.crops > 1 and method.spatial):
                if name != "none":
                    skipped.append(f"{label}: no selection on all candidates to time without the model")
            else:
                timing = selection_ms_per_image(method, budget, shape, select_batches, reps)
                kept = random_signals(method, shape, 1)
                with torch.no_grad():
                    [selection] = method.select(kept, budget)
                newlines = newline_rows(selection, shape)
                tokens = selection.num_tokens + newlines
                cost = request_cost(shape, tokens, text_tokens, projected_tokens=selection.num_tokens)
                stage = getattr(method, "llm_stage", None)
                if stage is None:
                    out.append(row(name, budget, float(tokens), newlines, cost, select=timing.ms_per_image))
                    continue
                plan = stage.plan(tokens, shape.llm_layers, Budget.parse("auto"))  # its own stage inside the LLM
                stages = [(st.layer, st.keep) for st in plan]
                cost = staged_cost(shape, tokens, stages, text_tokens, projected_tokens=selection.num_tokens)
                out.append(row(name, budget, average_tokens(plan, tokens, shape.llm_layers), newlines, cost, stages,
                               select=timing.ms_per_image))
    return out, skipped
