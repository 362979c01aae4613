"""How many threads torch uses in the calling thread and in engine scheduler threads."""

from __future__ import annotations

import torch

_scheduler_threads: int | None = None  # intra-op threads for scheduler threads; see serial_main_thread


def serial_main_thread() -> None:
    """Let the calling (main) thread run torch ops on one thread only, and scheduler threads
    started later (Engine.start) on as many as torch had.

    Why: torch's OpenMP runtime (libgomp) spins only briefly while it waits when it manages more
    threads than there are cores. A main thread that has run a multi-threaded op keeps an idle
    team of OpenMP threads; a scheduler thread's team on top of it crosses that line, and decoding
    measured ~35 % slower (GPT-2 124M, batch 1, 2 cores: 29 vs 45 tokens/s). A server's main
    thread only runs the event loop, so it gives up its team. Call it before any torch work.
    """
    global _scheduler_threads
    _scheduler_threads = _scheduler_threads or torch.get_num_threads()
    torch.set_num_threads(1)


def scheduler_threads() -> int:
    """Intra-op threads for a scheduler thread started now."""
    return _scheduler_threads or torch.get_num_threads()
