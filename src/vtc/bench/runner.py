"""`vtc bench`: methods x budgets x tasks on one model, data-parallel, resumable, every sample stored durably.

Determinism: batches are cut from each task's sample list in a fixed order and dealt
round-robin to the processes, so every batch (and so every result) is the same whether
one process or several run it. On resume, a batch with any missing sample runs again as
a whole (the same batch as before) and only the missing records are appended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cost import Shape, is_native, request_cost
from ..methods import Budget, VTCError, get
from ..speed import peak_memory
from .store import ResultStore, done_keys, record_key
from .tasks import Task, TaskSample, load_task


@dataclass
class Plan:
    tasks: list[Task]
    combos: list[tuple[str, Budget | str]]  # (method, budget; chained budgets stay strings like 'auto>64')
    skipped: list[str]  # combos that cannot run (e.g. 'auto' for a method without a dynamic rule)


def load_tasks(task_specs: list[str], limit: int | None) -> list[Task]:
    """Load and check every task; needs no model, so it can run before one loads.

    A wrong data file, an empty task or a task with no usable sample is a VTCError here.
    """
    if not task_specs:
        raise VTCError("no tasks given: name at least one, e.g. --tasks synthetic")
    return [load_task(spec, limit) for spec in task_specs]  # raises on an empty task


def make_plan(pipe, task_specs: list[str], methods: list[str], budgets: list[str], limit: int | None,
              tasks: list[Task] | None = None) -> Plan:
    """Validate everything before the first sample runs: unknown names, impossible budgets, bad or empty tasks fail here.

    A chained method ('recoverable>fastv') takes the chained budgets ('auto>64'); single methods
    take the plain ones. ``tasks``, when given, are the already loaded ``load_tasks(task_specs, limit)``
    (a caller loads them before the model, so that bad data fails before the slow part).
    """
    from ..pipeline import resolve

    n = getattr(pipe.adapter, "num_patches", None)  # None: native resolution (Qwen-VL), N is the image's own
    plain = [Budget.parse(b) for b in budgets if ">" not in b]
    chained = [b for b in budgets if ">" in b]
    for b in plain:
        # a tiled or native-resolution family's token count differs per image: checked per image as it runs
        if not b.is_auto and not pipe.adapter.tiled and n is not None:
            try:
                b.tokens(n)
            except VTCError as exc:
                raise VTCError(f"budget {b}: {exc} (this model has {n} patch tokens per image)") from None
    combos, skipped = [], []
    for name in methods:
        if name == "none":  # the full-token reference runs once, whatever the budgets
            combos.append(("none", Budget.parse("auto")))
            continue
        if ">" in name:
            for b in chained:
                resolve(name, b, {})  # raises on a bad chain or budget
                combos.append((name, b))
            if not chained:
                skipped.append(f"{name} (a chained method needs chained budgets such as 'auto>64')")
            continue
        method = get(name)
        for b in plain:
            if b.is_auto and not method.supports_auto:
                skipped.append(f"{name}@auto (no dynamic rule)")
            else:
                combos.append((name, b))
    if tasks is None:  # after the cheap checks: loading reads every annotation file
        tasks = load_tasks(task_specs, limit)
    if not combos:
        raise VTCError("nothing to run: no method and budget combination is runnable" + (f" ({'; '.join(skipped)})" if skipped else ""))
    return Plan(tasks, combos, skipped)


def _batches(samples: list[TaskSample], size: int) -> list[list[TaskSample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def _base_record(task: Task, sample: TaskSample, method: str, budget: Budget) -> dict:
    return {"task": task.name, "sample_id": sample.id, "method": method, "budget": str(budget),
            "answer": sample.answer, "meta": sample.meta, "error": None}


class BenchRunner:
    def __init__(self, pipe, out: Path, batch_size: int = 8, process_index: int = 0, num_processes: int = 1):
        self.pipe, self.out, self.batch_size = pipe, Path(out), batch_size
        self.rank, self.world = process_index, num_processes
        # a native-resolution model's (Qwen-VL) tower cost depends on each image's grid: built per image in _generate
        self.shape = None if is_native(pipe.model.config) else Shape.from_config(pipe.model.config)
        self.store = self._open_store()
        self.maps = self.out / "maps"

    def _open_store(self) -> ResultStore:
        """This process's shard, locked; if any process of the run is refused its lock, the whole run is refused."""
        store, problem = None, None
        try:
            store = ResultStore(self.out, shard=self.rank)
        except VTCError as exc:
            problem = str(exc)
        problems = [problem]
        if self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            problems = [None] * self.world
            torch.distributed.all_gather_object(problems, problem)
        refused = next((p for p in problems if p), None)
        if refused:
            if store is not None:
                store.close()
            raise VTCError(refused)
        return store

    def _save_map(self, task: Task, method: str, budget: Budget, image, result) -> None:
        """One token-map picture per task/method/budget (the first sample process 0 runs), for the HTML report."""
        from ..viz import layout_token_map

        path = self.maps / f"{task.name}__{method}__{budget}.png".replace("/", "_")
        if self.rank == 0 and not path.exists():
            self.maps.mkdir(parents=True, exist_ok=True)
            layout_token_map(image, result.selection, self.pipe.adapter.map_panels(result.selection)).save(path)

    def run(self, plan: Plan, progress=None) -> int:
        """Run this process's share of the plan; returns the number of records written now."""
        done = done_keys(self.out)
        written = 0
        for task in plan.tasks:
            for method, budget in plan.combos:
                mine = _batches(task.samples, self.batch_size)[self.rank :: self.world]
                bar = progress.add_task(f"{task.name} {method}@{budget}", total=sum(map(len, mine))) if progress else None
                self._warm_up(task, mine, done, method, budget)
                for batch in mine:
                    records = [_base_record(task, s, method, budget) for s in batch]
                    missing = [r for r in records if record_key(r) not in done]
                    if missing:
                        self._run_batch(task, batch, records, method, budget)
                        for r in records:
                            if record_key(r) not in done:
                                self.store.append(r)
                                done.add(record_key(r))
                                written += 1
                    if progress:
                        progress.update(bar, advance=len(batch))
        self.store.close()
        return written

    def _warm_up(self, task: Task, mine: list[list[TaskSample]], done: set, method: str, budget) -> None:
        """One untimed request per method/budget before its timed batches (first-call costs are not the method's)."""
        pending = [s for batch in mine for s in batch if record_key(_base_record(task, s, method, budget)) not in done and not s.error]
        for sample in pending[:1]:
            try:
                self.pipe([sample.load_image()], [sample.question], method=method, budget=budget, max_new_tokens=1)
            except Exception:  # noqa: BLE001 - the timed run records the failure, per sample
                pass

    def _run_batch(self, task: Task, batch: list[TaskSample], records: list[dict], method: str, budget: Budget) -> None:
        """Fill ``records`` in place: predictions and scores, or a per-sample error."""
        ready, images = [], []
        for sample, record in zip(batch, records):
            if sample.error:
                record["error"] = sample.error
                continue
            try:
                images.append(sample.load_image())
                ready.append((sample, record))
            except (VTCError, OSError) as exc:
                record["error"] = f"image: {exc}"
        if not ready:
            return
        try:
            self._generate(task, ready, images, method, budget)
        except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run
            if len(ready) == 1:
                _record_failure(ready[0][1], exc)
                return
            for pair, image in zip(ready, images):  # find the sample at fault; its batch-mates still count
                try:
                    self._generate(task, [pair], [image], method, budget)
                except Exception as single:  # noqa: BLE001
                    _record_failure(pair[1], single)

    def _generate(self, task: Task, pairs, images, method: str, budget: Budget) -> None:
        questions = [s.question for s, _ in pairs]
        inputs = self.pipe.prepare(images, questions)
        with peak_memory(self.pipe.model.device) as peak:
            start = time.perf_counter()
            results = self.pipe.generate(inputs, questions, method, budget, max_new_tokens=task.max_new_tokens)
            total_ms = (time.perf_counter() - start) * 1e3
        image_tokens = self.pipe.adapter.tokens_before(inputs)
        text_tokens = int(inputs["attention_mask"].sum(1).float().mean()) - round(sum(image_tokens) / len(image_tokens))
        self._save_map(task, method, budget, images[0], results[0])
        for i, ((sample, record), result) in enumerate(zip(pairs, results)):
            shape = self.shape or Shape.from_config(self.pipe.model.config, patch_grid=tuple(inputs["image_grid_thw"][i, 1:].tolist()))
            cost = request_cost(shape, result.tokens_after, text_tokens, bytes_per_value=2)
            record.update(
                prediction=result.text,
                score=task.score(result.text, sample),
                tokens_before=result.tokens_before,
                tokens_kept=result.tokens_after,
                batch_size=len(pairs),
                prefill_ms=round(result.timings["prefill_ms"] / len(pairs), 3),
                decode_ms_per_token=round(result.timings.get("decode_ms_per_token", float("nan")), 3),
                total_ms=round(total_ms / len(pairs), 3),
                flops=cost["total_prefill_flops"],
                llm_prefill_flops=cost["prefill_flops"],
                kv_cache_bytes=cost["kv_cache_bytes"],
                peak_bytes=int(peak["peak"]),
            )


_RESULT_FIELDS = ("prediction", "score", "tokens_before", "tokens_kept", "batch_size", "prefill_ms", "decode_ms_per_token",
                  "total_ms", "flops", "llm_prefill_flops", "kv_cache_bytes", "peak_bytes")


def _record_failure(record: dict, exc: Exception) -> None:
    """A per-sample failure: the message (with the exception type unless it is a VTCError), no stale results."""
    for name in _RESULT_FIELDS:
        record.pop(name, None)
    record["error"] = str(exc) if isinstance(exc, VTCError) else f"{type(exc).__name__}: {exc}"


def process_info() -> tuple[int, int, object]:
    """(rank, world size, state) from accelerate (one process when not launched by it)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state
