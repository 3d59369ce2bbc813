"""Selection time of every vision-side method, per image at batch 1, 16 and 64, next to the estimated GPU prefill.

    python scripts/bench_selection.py [--reps 10] [--budgets 64,128,192,auto] [--batches 1,16,64]
                                      [--methods fastervlm,recoverable] [--compare-naive] [--fresh-pages]

Signals have LLaVA-1.5-7B shapes (576 patches on 24 x 24, features 1024-d, keys 1024-d
or 64-d head means, projected tokens 4096-d) with random values, only those each method
reads; selection cost depends on shapes, not values (``vtc.speed.selection_ms_per_image``:
one warm-up call per batch size, then the median of ``--reps`` calls, divided by the batch).
The reference is the same request's prefill on a GPU, estimated from its FLOPs
(``vtc.cost.gpu_request_ms``: vision tower + projector + 32-layer LLM prefill at the
method's tokens and 64 text tokens, A100 bf16 peak at the stated utilisation).
Torch runs on ONE thread (``torch.set_num_threads(1)``) so numbers compare across runs and
machines. Freed memory is kept for reuse (``vtc.speed.reuse_freed_memory``), as a GPU's caching
allocator keeps it: with glibc's defaults every large temporary is fresh, page-faulting memory,
and that costs more than most methods' arithmetic (``--fresh-pages`` shows it). Signal extraction is not included (see scripts/bench_overhead.py); ``none``,
``downsample`` (a smaller tower forward, not a selection) and in-LLM methods are left out.

``--floors`` also times, for the methods built on one large matrix product, that product alone (a batched
matmul of the same shape, same batch, same run; for Recoverable Compression its centres against the leftovers
whose text score can make them a neighbour): the part of the method's time that no rewrite of the
selection logic removes on this machine; the rest is what is left to optimise. For the methods that fold
every patch into a weighted sum (EViT, VisionZip) it is that sum: every feature row read once.

``--compare-naive`` also times the frozen per-image implementations in tests/naive/ (the
code before issue 21's batching) in the same run, for the methods that have one there
(found by class name), and checks that old and new give the same tokens on one batch.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import statistics
import sys
import time
from pathlib import Path

import torch

from vtc.cost import GPU_ASSUMPTION, Shape, gpu_request_ms, request_cost
from vtc.methods import Budget, Method, VTCError, available, get, lof
from vtc.shapes import llava15_config
from vtc.speed import random_signals, reuse_freed_memory, selection_ms_per_image, times_selection

TEXT_TOKENS = 64
TESTS = Path(__file__).resolve().parents[1] / "tests"


def naive_classes() -> dict[str, type]:
    """Method classes defined in tests/naive/*.py, by class name (what exists on this branch)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import naive

    found = {}
    for info in pkgutil.iter_modules(naive.__path__):
        module = importlib.import_module(f"naive.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__:
                found[name] = cls
    return found


def naive_twin(method: Method, classes: dict[str, type]) -> Method | None:
    """The frozen per-image class of the same name, with the method's options (its instance state) copied
    over; a wrapped method (e.g. X+text's base) is replaced by its own twin. None when there is none."""
    cls = classes.get(type(method).__name__)
    if cls is None:
        return None
    try:
        twin = cls()  # defaults first, for attributes the new code no longer keeps
    except TypeError:  # a constructor with required arguments (a wrapper): the state below sets them
        twin = cls.__new__(cls)
    for key, value in vars(method).items():
        if isinstance(value, Method):
            value = naive_twin(value, classes)
            if value is None:
                return None
        setattr(twin, key, value)
    return twin


def same_output(new: Method, old: Method, shape: Shape, budget: Budget) -> bool:
    """Old and new select the same tokens, with the same origins, on one random batch of 3."""
    a = new.select(random_signals(new, shape, 3, seed=1), budget)
    b = old.select(random_signals(old, shape, 3, seed=1), budget)
    return len(a) == len(b) and all(
        x.tokens.shape == y.tokens.shape and torch.allclose(x.tokens, y.tokens, atol=1e-5) and torch.equal(x.origin, y.origin)
        for x, y in zip(a, b)
    )


def floor_product(name: str, method: Method, shape: Shape, tokens: float, budget: Budget) -> tuple[int, int, int] | None:
    """(m, n, d) of the one matrix product ``name``'s selection cannot do without, or None."""
    n = shape.num_candidates
    space = getattr(method, "space", "features")
    width = shape.llm_width if space == "projected" else shape.vision_width
    if name in ("divprune", "cdpruner"):  # every token's similarity to every other (nearest others; the DPP kernel)
        return n, n, width
    if name == "todre":  # the N x N cosine matrix its greedy picks read
        return n, n, shape.vision_width
    if name in ("prumerge", "prumerge+"):  # each kept token against every patch's key
        return max(1, round(tokens)), n, shape.vision_width
    if name in ("evit", "visionzip"):  # one weighted sum over every patch's feature row: the features read once
        return 1, shape.feature_width, n
    if name == "recoverable":  # each merge centre's key against the keys of the leftovers it can reach
        return centre_product(method, shape, budget)
    return None


def centre_product(method: Method, shape: Shape, budget: Budget) -> tuple[int, int, int]:
    """(centres, candidates, width) of Recoverable Compression's centre-key product, on average over 16 random
    LLaVA-shaped images at ``budget``: the centres each image merges around (0 to ~30; on the CPU each image's
    product runs at its own count) against the batch's reachable leftovers (``reachable_candidates``; the
    widest image's count, which the batch shares), read from the product's own arguments."""
    from vtc.methods import recoverable

    seen = []
    real = recoverable.centre_dots

    def spy(ctr_keys, cand_keys, n_ctr):
        seen.append((n_ctr.float().mean().item(), cand_keys.shape[1]))
        return real(ctr_keys, cand_keys, n_ctr)

    recoverable.centre_dots = spy
    try:
        method.select(random_signals(method, shape, 16, seed=1), budget)
    finally:
        recoverable.centre_dots = real
    centres, columns = seen[0] if seen else (0, shape.num_candidates)
    return max(1, round(centres)), columns, shape.vision_width


def product_ms_per_image(m: int, n: int, d: int, batches: list[int], reps: int) -> dict[int, float]:
    """Median time per image of a (b, m, d) @ (b, d, n) batched matmul at each batch size."""
    out = {}
    for b in batches:
        x, y = torch.randn(b, m, d), torch.randn(b, d, n)
        x @ y  # warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        out[b] = 1000 * statistics.median(times) / b
    return out


def ms_cells(ms: dict[int, float]) -> str:
    return "".join(f"{v:>8.3f}" for v in ms.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="timed calls per batch size (median)")
    parser.add_argument("--budgets", default="64,128,192,auto")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--methods", default="", help="comma-separated (default: every vision-side method)")
    parser.add_argument("--floors", action="store_true", help="also time each matrix-product-bound method's product alone")
    parser.add_argument("--compare-naive", action="store_true", help="also time the frozen per-image code in tests/naive/")
    parser.add_argument(
        "--fresh-pages", action="store_true",
        help="leave glibc's malloc as it is: large temporaries page-fault on first touch (see reuse_freed_memory)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    reused = False if args.fresh_pages else reuse_freed_memory()
    budgets = [Budget.parse(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    names = [m.strip() for m in args.methods.split(",") if m.strip()] or available()
    shape = Shape.from_config(llava15_config())
    classes = naive_classes() if args.compare_naive else {}

    print(f"torch threads: {torch.get_num_threads()} (torch.set_num_threads(1), for comparable numbers); CPU selection on random")
    print(f"LLaVA-1.5-7B-shape signals ({shape.num_patches} patches); GPU prefill estimated from FLOPs: {GPU_ASSUMPTION},")
    print(f"vision tower + projector + 32-layer LLM at the method's tokens + {TEXT_TOKENS} text tokens")
    print("LOF (Recoverable Compression, X+text): " + ("lof_cpu's compiled loop (numba)" if lof.cpu_kernel() else
          "the torch form (numba not installed)"))
    print("freed memory reused (glibc mallopt, as a GPU's caching allocator)" if reused else
          "fresh pages for every large temporary (glibc malloc defaults): page faults included")
    if args.compare_naive:
        listed = ", ".join(sorted(c for c in classes if not c.startswith("_")))
        print(f"old = frozen per-image code in tests/naive/ ({listed}); x = old / new at each batch")
    head = "".join(f"{f'b={b}':>8}" for b in batches)
    width = 8 * len(batches)
    print(f"\n{'':<30}  {'ms per image':>{width}}  {'GPU':>6}  {'% of GPU prefill':>{width}}")
    print(f"{'method':<16}{'budget':>7}{'tokens':>7}  {head}  {'ms':>6}  {head}")
    for name in names:
        method = get(name)
        if not times_selection(method):
            continue
        twin = naive_twin(method, classes) if args.compare_naive else None
        for budget in budgets:
            if budget.is_auto and not method.supports_auto:
                continue
            try:
                new = selection_ms_per_image(method, budget, shape, batches, args.reps)
            except VTCError as exc:
                print(f"{name:<16}{str(budget):>7}  skipped: {exc}")
                continue
            gpu = gpu_request_ms(request_cost(shape, round(new.tokens), TEXT_TOKENS))["prefill_ms"]
            shares = "".join(f"{100 * v / gpu:>7.1f}%" for v in new.ms_per_image.values())
            print(f"{name:<16}{str(budget):>7}{new.tokens:>7.1f}  {ms_cells(new.ms_per_image)}  {gpu:>6.1f}  {shares}", flush=True)
            product = floor_product(name, method, shape, new.tokens, budget) if args.floors else None
            if product is not None:
                floor = product_ms_per_image(*product, batches, args.reps)
                share = "".join(f"{100 * floor[b] / new.ms_per_image[b]:>7.0f}%" for b in batches)
                label = "x".join(str(v) for v in product)
                print(f"{'  its matmul':<16}{label:>14}  {ms_cells(floor)}  {'':>6}  {share}  of the method's time", flush=True)
            if twin is not None:
                old = selection_ms_per_image(twin, budget, shape, batches, args.reps)
                faster = "".join(f"{old.ms_per_image[b] / new.ms_per_image[b]:>7.1f}x" for b in batches)
                same = "same output" if same_output(method, twin, shape, budget) else "OUTPUT DIFFERS"
                print(f"{'  old':<16}{'':>7}{old.tokens:>7.1f}  {ms_cells(old.ms_per_image)}  {'':>6}  {faster}  {same}", flush=True)


if __name__ == "__main__":
    main()
