"""`vtc speed`: wall-clock savings of every method on the real LLaVA-1.5-7B shape (random weights).

For each method and budget, in one process, interleaved with the full-token run and
repeated: the vision tower (with the method's signal extraction), the method's own
selection, the projector, the LLM prefill, the time per decoded token, the KV-cache
bytes and the peak memory of the prefill. ``llm_layers`` builds fewer decoder layers
than the 32 of Llama-7B; decoder layers are timed one by one (forward hooks), and the
32-layer figures are extrapolated as (measured prefill - measured layers) + mean layer
time x 32. Every extrapolated figure says so.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cost import A100_BF16_TFLOPS, PREFILL_UTILISATION, Shape, gpu_request_ms, request_cost, staged_cost
from .methods import Budget, Method, Signal, Signals, VTCError, get
from .models.llava import LlavaAdapter
from .shapes import build_llava15, clip_text_scorer_vit_l

FULL_DEPTH = 32
QUESTION = "what is the color of the small triangle left of the red car ?"
SELECT_BATCHES = (1, 16, 64)  # batch sizes the selection is timed at
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
    tokens: float  # image tokens sent to the LLM (in-LLM methods: averaged over the 32 layers)


@dataclass
class Row:
    """The samples of one method at one budget; ``stages`` is an in-LLM method's 32-layer plan, (layer, tokens kept)."""

    method: str
    budget: str
    samples: list[Sample] = field(default_factory=list)
    stages: list[tuple[int, int]] = field(default_factory=list)
    select_ms_per_image: dict[int, float] = field(default_factory=dict)  # batch size -> median ms per image

    def stage_depths(self) -> list[int] | None:
        """How many of the 32 layers each stage spans (None: one stage, no pruning inside the LLM)."""
        if not self.stages:
            return None
        bounds = [0] + [layer for layer, _ in self.stages] + [FULL_DEPTH]
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


def times_selection(method) -> bool:
    """True for methods whose selection is timed alone: vision-side, and not 'none' or 'downsample'."""
    return not getattr(method, "in_llm", False) and method.name not in NOT_A_SELECTION


def random_signals(method, shape: Shape, batch: int, seed: int = 0, device="cpu") -> Signals:
    """Random signals of the model's real shape for ``batch`` images, only those ``method.needs``.

    Selection cost depends on shapes, not values: features and keys are vision-width (keys
    head-averaged: vision_width // vision_heads), projected tokens LLM-width, attention rows
    softmax-like and positive.
    """
    g = torch.Generator().manual_seed(seed)
    n, d = shape.num_patches, shape.vision_width
    keys_dim = d // shape.vision_heads if method.attention.keys == "head_mean" else d
    make = {
        Signal.CLS_ATTN: lambda: torch.randn(batch, n, generator=g).mul(2).softmax(-1),
        Signal.KEYS: lambda: torch.randn(batch, n, keys_dim, generator=g),
        Signal.TEXT_SIM: lambda: torch.rand(batch, n, generator=g) * 0.3,
        Signal.PROJECTED: lambda: torch.randn(batch, n, shape.llm_width, generator=g),
        Signal.RECEIVED_ATTN: lambda: torch.rand(batch, n, generator=g) / n,
        Signal.CLS_FEATURE: lambda: torch.randn(batch, d, generator=g),
    }
    present = {name: make[name]().to(device) for name in make if name in method.needs}
    return Signals(features=torch.randn(batch, n, d, generator=g).to(device), grid=shape.grid, **present)


@dataclass
class SelectionTiming:
    """Median selection time per image at each batch size, and the mean tokens kept per image."""

    ms_per_image: dict[int, float]
    tokens: float


def selection_ms_per_image(method, budget, shape: Shape, batches=SELECT_BATCHES, reps: int = 5, device="cpu") -> SelectionTiming:
    """Time ``method.select`` alone on random real-shape signals (``random_signals``), per image.

    Per batch size: one warm-up call (it also runs the once-per-Signals finiteness check, which
    the pipeline pays where signals are made, not per selection), then ``reps`` timed calls on the
    same signals; the median divided by the batch size. ``tokens`` is the mean output count of the
    warm-up at the first batch size (what an 'auto' budget chose on these signals).
    """
    if not times_selection(method):
        raise VTCError(f"'{method.name}' has no selection of its own to time (in-LLM, 'none' or 'downsample')")
    if reps < 1 or not batches or min(batches) < 1:
        raise VTCError(f"selection timing needs reps >= 1 and batch sizes >= 1, got reps={reps}, batches={list(batches)}")
    device = torch.device(device)
    budget = Budget.parse(budget)
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
    """The model, inputs and timers of one `vtc speed` run."""

    def __init__(self, llm_layers: int = 2, text_tokens: int = 64, decode_tokens: int = 8, device: str = "auto", model=None, text_scorer=None):
        """``model`` / ``text_scorer`` default to the LLaVA-1.5-7B shape with ``llm_layers`` decoder layers (tests pass tiny ones)."""
        if llm_layers < 1 or llm_layers > FULL_DEPTH:
            raise VTCError(f"--llm-layers must be between 1 and {FULL_DEPTH}, got {llm_layers}")
        if text_tokens < 2:
            raise VTCError(f"--text-tokens must be at least 2, got {text_tokens}")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = (model if model is not None else build_llava15(llm_layers, self.dtype)).to(self.device)
        scorer = text_scorer if text_scorer is not None else clip_text_scorer_vit_l()
        self.adapter = LlavaAdapter(self.model, scorer.to(self.device, self.dtype))
        self.layers = self.model.model.language_model.layers
        self.llm_layers, self.decode_tokens, self.text_tokens = len(self.layers), decode_tokens, text_tokens
        self.shape = Shape.from_config(self.model.config, llm_layers=FULL_DEPTH)
        g = torch.Generator().manual_seed(0)
        size = self.adapter.tower.config.image_size
        self.pixels = torch.randn(1, 3, size, size, generator=g).to(self.device, self.dtype)
        image_id = self.model.config.image_token_id
        vocab = self.model.config.text_config.vocab_size
        text = torch.randint(2, min(vocab, image_id), (text_tokens,), generator=g)
        image = torch.full((self.adapter.num_patches,), image_id)
        half = text_tokens // 3  # system prompt before the image, question after it
        self.input_ids = torch.cat([text[:half], image, text[half:]])[None].to(self.device)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.skipped: list[str] = []
        self.stage_plans: dict[tuple[str, str], list[tuple[int, int]]] = {}  # in-LLM (method, budget) -> 32-layer stages

    @torch.no_grad()
    def run_once(self, method, budget: Budget, time_tower: bool = False) -> Sample:
        """One timed request. ``method`` is a vision-side Method, or an in-LLM method run on all N tokens.

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
            self.model.model.vision_tower(self.pixels, output_hidden_states=True)
            _sync(d)
            tower = _ms(t)

        t = time.perf_counter()
        grid = vision.input_grid(vision_budget, self.adapter.grid)
        signals = self.adapter.signals(self.pixels, vision.needs, vision.attention, [QUESTION], grid=grid, text=vision.text)
        _sync(d)
        signals_ms = _ms(t)
        t = time.perf_counter()
        selections = vision.select(signals, vision_budget)
        _sync(d)
        select_ms = _ms(t)
        t = time.perf_counter()
        projected = self.adapter.project(selections)
        ids, mask = self.adapter.splice_ids(self.input_ids, self.attention_mask, [selections[0].num_tokens], 0)
        _sync(d)
        project_ms = _ms(t)

        pruner, tokens = None, float(selections[0].num_tokens)
        if in_llm:
            pruner, tokens = self._pruner(method, budget, ids, mask)
        clock = _LayerClock(self.layers)
        try:
            with pruner if pruner is not None else nullcontext():
                with peak_memory(d) as peak:
                    t = time.perf_counter()
                    out = self.model(
                        input_ids=ids, attention_mask=mask, mm_encoder_outputs=self.adapter.image_inputs(projected),
                        use_cache=True, logits_to_keep=1,
                    )
                    _sync(d)
                    prefill_ms = _ms(t)
                layers_ms = clock.take_ms()
                cache = out.cache
                kv_bytes = _cache_bytes(cache)
                token = out.logits[:, -1:].argmax(-1)
                t = time.perf_counter()
                for _ in range(self.decode_tokens):
                    mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                    step = self.model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
                    cache, token = step.cache, step.logits[:, -1:].argmax(-1)
                _sync(d)
                decode = _ms(t) / self.decode_tokens
                decode_layers = [x / self.decode_tokens for x in clock.take_ms()]
        finally:
            clock.remove()
        return Sample(tower, signals_ms, select_ms, project_ms, prefill_ms, layers_ms, decode, decode_layers, kv_bytes, peak["peak"], tokens)

    def _pruner(self, method, budget: Budget, ids, mask):
        """The in-LLM method's 32-layer plan, replayed on the built layers 1..S (one built layer per stage)."""
        from .methods.llm_base import PlanOverride, average_tokens
        from .models.llm_prune import InLLMPruner

        n = self.adapter.num_patches
        plan = method.plan(n, FULL_DEPTH, budget)
        if len(plan) + 1 > self.llm_layers:
            raise VTCError(f"{method.name} prunes in {len(plan)} stages: build at least {len(plan) + 1} decoder layers (--llm-layers)")
        replay = PlanOverride(method, [st.keep for st in plan])
        pruner = InLLMPruner(self.model.model.language_model, replay, Budget.parse(1.0), ids, mask, self.model.config.image_token_id)
        self.stage_plans[(method.name, str(budget))] = [(st.layer, st.keep) for st in plan]
        return pruner, average_tokens(plan, n, FULL_DEPTH)


def to_full_depth(measured_ms: float, layers_ms, stage_depths: list[int] | None = None) -> float:
    """Extrapolate a timing with a few built decoder layers to Llama-7B's 32.

    Vision-side methods: every layer sees the same tokens, so the mean layer time x 32.
    In-LLM methods (``stage_depths``: how many of the 32 layers each stage spans): built layer s
    runs stage s, the last stage runs on all remaining built layers; each stage's mean layer
    time is multiplied by its depth in the 32-layer plan.
    """
    layers_ms = list(layers_ms)
    outside = measured_ms - sum(layers_ms)
    if not stage_depths:
        return outside + sum(layers_ms) / len(layers_ms) * FULL_DEPTH
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
    """Medians (and spread) per method/budget, extrapolated to 32 layers, next to the analytical FLOPs ratio.

    A pure function of the measured samples: ``rows[0]`` is the full-token run ('none', whose
    samples carry the stock tower time); ``shape`` is the 32-layer model the costs are for.
    End-to-end prefill = our tower run + selection + projector + the 32-layer LLM prefill; a
    method's own overhead = its tower run minus the stock tower, plus its selection.

    GPU columns: the request's prefill estimated from its FLOPs at ``tflops`` x ``utilisation``
    (``cost.gpu_request_ms``; default an A100 in bf16 at 50%): ``gpu_prefill_ms`` = vision tower +
    projector + LLM prefill at this row's tokens, ``gpu_prefill_ms_full`` the same at all N tokens.
    ``select_ms_per_image`` (batch size -> ms, as a string key) is the row's selection timed alone
    (``selection_ms_per_image``; empty for rows without one), and ``select_share_of_gpu_prefill``
    each of those over ``gpu_prefill_ms``.
    """
    med = statistics.median
    full = rows[0]
    if full.method != "none":
        raise VTCError(f"the first speed row must be the full-token run 'none', got '{full.method}'")

    def prefill_32(s: Sample, row: Row) -> float:
        return to_full_depth(s.prefill_ms, s.layers_ms, row.stage_depths())

    def decode_32(s: Sample, row: Row) -> float:
        return to_full_depth(s.decode_ms_per_token, s.decode_layers_ms, row.stage_depths())

    def e2e(s: Sample, row: Row) -> float:
        return s.signals_ms + s.select_ms + s.project_ms + prefill_32(s, row)

    full_e2e = med(e2e(s, full) for s in full.samples)
    stock_tower = med(s.tower_ms for s in full.samples)
    full_tokens = int(full.samples[0].tokens)
    full_cost = request_cost(shape, full_tokens, text_tokens)
    full_flops = full_cost["total_prefill_flops"]
    gpu_full = gpu_request_ms(full_cost, tflops, utilisation)["prefill_ms"]
    out = []
    for row in rows:
        s = row.samples
        tokens = med(x.tokens for x in s)
        e2e_all = [e2e(x, row) for x in s]
        own = [x.signals_ms - stock_tower + x.select_ms for x in s]  # what the method adds to the stock tower
        cost = request_cost(shape, round(tokens), text_tokens)
        if row.stages:  # in-LLM: the LLM prefill sees N image tokens until the first stage, fewer after
            cost = staged_cost(shape, full_tokens, row.stages, text_tokens)
        speedup = full_e2e / med(e2e_all)
        flops_ratio = full_flops / cost["total_prefill_flops"]
        gpu = gpu_request_ms(cost, tflops, utilisation)
        select_each = sorted(row.select_ms_per_image.items())
        out.append(
            {
                "method": row.method,
                "budget": row.budget,
                "tokens": tokens,
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
                "select_ms_per_image": {str(b): round(ms, 3) for b, ms in select_each},
                "gpu_vision_ms": round(gpu["vision_ms"], 2),
                "gpu_llm_prefill_ms": round(gpu["llm_prefill_ms"], 2),
                "gpu_prefill_ms": round(gpu["prefill_ms"], 2),
                "gpu_prefill_ms_full": round(gpu_full, 2),
                "select_share_of_gpu_prefill": {str(b): round(ms / gpu["prefill_ms"], 4) for b, ms in select_each},
            }
        )
    return out


def run_speed(
    methods: list[str], budgets: list[str], llm_layers: int, reps: int, text_tokens: int, decode_tokens: int, progress=None, bench=None,
    select_batches=SELECT_BATCHES,
) -> tuple[SpeedBench, list[dict]]:
    """Measure every (method, budget) against full tokens, interleaved, ``reps`` times; then each vision-side
    method's selection alone, per image at each of ``select_batches`` (at least 5 timed calls per size)."""
    bench = bench or SpeedBench(llm_layers, text_tokens, decode_tokens)
    from .methods.llm_base import budget_for_average

    plan = [("none", Budget.parse("auto"))]
    for name in methods:
        method = get(name)
        for b in budgets:
            budget = Budget.parse(b)
            if budget.is_auto and not method.supports_auto:
                continue
            if getattr(method, "in_llm", False) and not budget.is_auto:  # papers compare in-LLM methods by layer average
                try:
                    budget = budget_for_average(method, budget.tokens(bench.adapter.num_patches), bench.adapter.num_patches, FULL_DEPTH)
                except VTCError as exc:
                    bench.skipped.append(f"{name}@{b}: {exc}")
                    continue
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
    timed = [(row, budget) for row, (name, budget) in zip(rows, plan) if times_selection(instances[name])]
    task = progress.add_task("selection", total=len(timed)) if progress and timed else None
    for row, budget in timed:
        timing = selection_ms_per_image(instances[row.method], budget, bench.shape, select_batches, max(5, reps), bench.device)
        row.select_ms_per_image = timing.ms_per_image
        if progress:
            progress.update(task, advance=1, description=f"selection {row.method}@{budget}")
    return bench, summarise(bench, rows)


def speed_plot(results: list[dict], path: Path) -> None:
    """Speed-up vs tokens kept, one marker set per method, with the analytical FLOPs-ratio curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    flops = sorted({(r["tokens"], r["flops_ratio"]) for r in results})
    ax.plot([t for t, _ in flops], [f for _, f in flops], "k--", label="analytical FLOPs ratio")
    for name in dict.fromkeys(r["method"] for r in results if r["method"] != "none"):
        pts = sorted((r["tokens"], r["speedup"]) for r in results if r["method"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, alpha=0.8)
    ax.set_xlabel("image tokens sent to the LLM")
    ax.set_ylabel("end-to-end prefill speed-up vs 576 tokens")
    ax.set_title("LLaVA-1.5-7B shape (32 LLM layers, extrapolated)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    speed_plot(results, out / "speed.png")
