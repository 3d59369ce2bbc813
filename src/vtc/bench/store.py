"""The result store: one JSON line per finished sample, flushed and fsync'd before the next one starts.

A run killed at any moment (SIGKILL included) loses at most the sample in flight: the
only damage a kill can do is a torn last line, which ``read`` skips. Each process of a
data-parallel run writes its own shard file, so writers never interleave.

One writer per shard: a store holds an OS lock (``flock``) on ``results.<shard>.lock``
from opening to ``close``. The lock is per shard, not per directory, because the
processes of one data-parallel run share the directory; every run has a process 0,
so two runs on one directory always meet on ``results.0.lock`` (the runner makes a
refusal in any process refuse the whole run). A second writer is refused at once with
the holder's pid, host and start time, rather than made to wait: a second run on a
busy store is almost always a mistake, and waiting would hang it for the whole first
run only to find every sample done. The kernel drops the lock when its process dies,
however it dies, so a killed run never blocks the next one; the lock files stay and
mean nothing without a live holder. (Where ``fcntl`` does not exist, on Windows,
stores are not locked.)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from ..methods.base import VTCError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

KEY_FIELDS = ("task", "method", "budget", "sample_id")


def record_key(record: dict) -> tuple:
    return tuple(str(record[k]) for k in KEY_FIELDS)


def _holder(text: str) -> str:
    """'pid 123 on host h, started ...' from a lock file's content (whatever a holder managed to write)."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, TypeError, KeyError):
        return "a process that has not written its details yet"


def lock_shard(path: Path):
    """An open file holding an exclusive flock on ``path`` (released by closing it, or by the process's death)."""
    handle = open(path, "a+", encoding="utf-8")  # never truncate before owning: the holder's details stay readable
    if fcntl is None:  # pragma: no cover - Windows
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = _holder(handle.read())
        handle.close()
        raise VTCError(f"result store {path.parent} is being written by another run ({holder}); "
                       "wait for it to finish or give another --out") from None
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
    handle.flush()
    return handle


class ResultStore:
    def __init__(self, directory: Path, shard: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"results.{shard}.jsonl"
        self._lock = lock_shard(self.directory / f"results.{shard}.lock")  # before repairing: never cut a live writer's line
        self._repair()
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        """Cut a torn last line (a write interrupted by a kill) so appends start on a clean line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        self._lock.close()  # closing the file releases the flock


def read_records(directory: Path) -> list[dict]:
    """Every complete record of every shard (a torn last line is skipped), deduplicated by key, sorted."""
    records = {}
    for path in sorted(Path(directory).glob("results.*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records.setdefault(record_key(record), record)
    return [records[k] for k in sorted(records)]


def done_keys(directory: Path) -> set[tuple]:
    return {record_key(r) for r in read_records(directory)}
