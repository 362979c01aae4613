"""The audit log: one JSON line per request, written by a thread so the event loop never waits
on the disk, and rotated by size (FILE -> FILE.1 -> ... -> FILE.<backups>, the oldest dropped).

    {"time": "2026-11-29T05:40:01.123Z", "key": "alice", "method": "POST",
     "route": "/v1/chat/completions", "model": "tiny", "status": 200, "prompt_tokens": 12,
     "completion_tokens": 30, "latency_ms": 412.5, "moderation": "ok"}

No prompt or completion text unless the log is opened with `text=True` (`--audit-log-text`).
Requests refused for want of a key (401) are logged one by one up to `noise_per_minute` a
minute; past that they are counted and the count is written as one line when the minute ends
(`{"unlogged_401s": N, ...}`), so nobody without a key can rotate the log's history away.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

from gptkit.server.context import RequestRecord
from gptkit.server.errors import log

_STOP = object()


def audit_entry(r: RequestRecord, text: bool) -> dict:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r.time)) + f".{int(r.time % 1 * 1000):03d}Z",
             "key": r.key_name, "method": r.method, "route": _short(r.route), "model": r.model, "status": r.status,
             "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
             "latency_ms": round(r.latency() * 1000, 1), "moderation": r.moderation}
    if text:
        entry.update(prompt=r.prompt_text, completion=r.completion_text)
    return entry


MAX_ROUTE = 200  # characters of a path kept: anyone, even without a key, chooses the path's length


def _short(route: str) -> str:
    return route if len(route) <= MAX_ROUTE else route[:MAX_ROUTE] + f"...(+{len(route) - MAX_ROUTE})"


class AuditLog:
    """`log(record)` from the event loop enqueues; the writer thread appends and rotates."""

    def __init__(self, path: str | Path, max_bytes: int = 100 * 2**20, backups: int = 5, text: bool = False,
                 noise_per_minute: int = 60, clock=time.monotonic):
        self.path, self.max_bytes, self.backups, self.text = Path(path), max_bytes, backups, text
        self.noise_per_minute, self.clock = noise_per_minute, clock
        self._noise_start, self._noise_logged, self._noise_unlogged = clock(), 0, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="gptkit-audit", daemon=True)
            self._thread.start()

    def log(self, record: RequestRecord) -> None:
        if record.status == 401 and record.key_name is None and not self._admit_noise():
            return
        # the entry is built now, on the event loop, so it sees the record as it is at the end
        self._queue.put(json.dumps(audit_entry(record, self.text), ensure_ascii=False) + "\n")

    def _admit_noise(self) -> bool:
        """Whether this minute may log one more unauthenticated request; a new minute first
        writes how many the last one left out."""
        now = self.clock()
        if now - self._noise_start >= 60:
            if self._noise_unlogged:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                self._queue.put(json.dumps({"time": stamp, "status": 401, "unlogged_401s": self._noise_unlogged,
                                            "note": f"over {self.noise_per_minute} a minute"}) + "\n")
            self._noise_start, self._noise_logged, self._noise_unlogged = now, 0, 0
        if self._noise_logged < self.noise_per_minute:
            self._noise_logged += 1
            return True
        self._noise_unlogged += 1
        return False

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    def _write_loop(self) -> None:
        f = self.path.open("ab")
        try:
            while (line := self._queue.get()) is not _STOP:
                data = line.encode("utf-8")
                if f.tell() and f.tell() + len(data) > self.max_bytes:
                    f.close()
                    self._rotate()
                    f = self.path.open("ab")
                f.write(data)
                if self._queue.empty():  # flush per burst, not per line
                    f.flush()
        except OSError:
            log.exception("audit log %s: write failed; no more audit lines are written", self.path)
        finally:
            f.close()

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
