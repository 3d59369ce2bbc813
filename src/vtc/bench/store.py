"""The result store: one JSON line per finished sample, flushed and fsync'd before the next one starts.

A run killed at any moment (SIGKILL included) loses at most the sample in flight: the
only damage a kill can do is a torn last line, which ``read`` skips. Each process of a
data-parallel run writes its own shard file, so writers never interleave.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

KEY_FIELDS = ("task", "method", "budget", "sample_id")


def record_key(record: dict) -> tuple:
    return tuple(str(record[k]) for k in KEY_FIELDS)


class ResultStore:
    def __init__(self, directory: Path, shard: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"results.{shard}.jsonl"
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
