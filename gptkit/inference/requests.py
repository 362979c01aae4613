"""A request to the engine (gptkit/inference/engine.py, whose docstring has the API and the
conventions events follow): the checks it passes at submit, the handle a caller holds, the
events and completions it yields, and the cache row each of its samples runs in.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from gptkit.config import DEFAULT_MAX_TOKENS, ModelConfig, SampleConfig
from gptkit.errors import GptkitError
from gptkit.text.stream import find_stop


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def fit_prompt(ids: list[int], max_tokens: int | None, context: int, truncate: bool = False) -> tuple[list[int], int]:
    """(prompt ids, max_tokens) that fit the context together. max_tokens None: DEFAULT_MAX_TOKENS, or
    what the context leaves. A prompt too long is an error, or with truncate loses its start."""
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, context - len(ids)))
    room = context - max_tokens
    if len(ids) > room:
        if room < 1:
            raise GptkitError(f"max_tokens {max_tokens} leaves no room for a prompt in the context of {context}")
        if not truncate:
            raise GptkitError(f"prompt of {_tokens(len(ids))} + max_tokens {max_tokens} = {len(ids) + max_tokens} > "
                              f"context {context}; --truncate keeps the prompt's last {room} tokens")
        ids = ids[-room:]
    return ids, max_tokens


@dataclass
class Event:
    """One step of one sample: a new token, and/or the end of the sample."""

    index: int  # sample index 0..n-1
    token_id: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled' on the last event
    stop_text_offset: int | None = None  # bytes of decoded output to keep, when a stop string matched


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    stop_text_offset: int | None = None  # bytes of decoded output to keep, when a stop string matched


class RequestHandle:
    """One submitted request: events for all n samples, cancel, and the final completions.

    `engine` is the Engine that runs it (gptkit.inference.engine); it is not imported here
    because engine.py imports this module. The handle calls its scheduler methods."""

    def __init__(self, engine, prompt: list[int], params: SampleConfig, n: int, stop_bytes: list[bytes]):
        self.engine, self.prompt, self.params, self.n = engine, prompt, params, n
        self.stop_bytes = stop_bytes  # params.stop as UTF-8, checked at submit
        self.cancelled = False
        self._lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None
        self._done = threading.Event()
        want_lp = params.logprobs is not None
        self._partial = [Completion([], "", [] if want_lp else None, [] if want_lp and params.logprobs else None)
                         for _ in range(n)]
        self._finished: set[int] = set()
        self.error: BaseException | None = None
        self.released = False  # its cache reservation was given back

    @property
    def need(self) -> int:
        """Cache positions the request may use: n x (prompt + max_tokens)."""
        return self.n * (len(self.prompt) + self.params.max_tokens)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating: unfinished samples end with 'cancelled' and their slots are free."""
        self.engine._cancel(self)

    def result(self, timeout: float | None = None) -> list[Completion]:
        """Block until every sample finished; the completions in sample order."""
        self.engine._drive_until(self._done, timeout)
        if self.error is not None:
            raise self.error
        return self._partial

    def __iter__(self) -> Iterator[Event]:
        remaining = self.n
        while remaining:
            item = self._next_event()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finish_reason is not None
            yield item

    async def aiter(self) -> AsyncIterator[Event]:
        """Events without blocking the event loop; the scheduler thread produces them."""
        self.engine.start()
        with self._lock:  # from now on events go to the asyncio queue, in order
            self._loop, self._aqueue = asyncio.get_running_loop(), asyncio.Queue()
            while not self._events.empty():
                self._aqueue.put_nowait(self._events.get_nowait())
        remaining = self.n
        while remaining:
            item = await self._aqueue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= item.finish_reason is not None
            yield item

    # --- engine side
    def _next_event(self) -> Event | BaseException:
        while True:
            try:
                return self._events.get(timeout=0.05 if self.engine._thread_alive() else 0)
            except queue.Empty:
                if not self.engine._thread_alive():
                    self.engine.step()

    def _put(self, item: Event | BaseException) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass
        else:
            self._events.put(item)

    def _emit(self, ev: Event) -> bool:
        """Record and deliver one event; False if its sample had already finished."""
        with self._lock:
            if ev.index in self._finished:
                return False
            c = self._partial[ev.index]
            if ev.token_id is not None:
                c.token_ids.append(ev.token_id)
                if c.logprobs is not None:
                    c.logprobs.append(ev.logprob)
                if c.top_logprobs is not None:
                    c.top_logprobs.append(ev.top_logprobs or {})
            if ev.finish_reason is not None:
                c.finish_reason, c.stop_text_offset = ev.finish_reason, ev.stop_text_offset
                self._finished.add(ev.index)
            self._put(ev)
            if len(self._finished) == self.n:
                self._done.set()
            return True

    def _finish_all(self, reason: str) -> None:
        for i in range(self.n):
            self._emit(Event(i, None, finish_reason=reason))

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
            self._finished = set(range(self.n))
            self._put(error)
            self._done.set()


# ------------------------------------------------------------------------------------ checks at submit
def check_request(prompt: list[int], params: SampleConfig, n: int, *, config: ModelConfig, max_batch: int,
                  max_cached_tokens: int, has_token_bytes: bool) -> list[bytes]:
    """GptkitError for a request an engine with these limits cannot run; else its stop strings as UTF-8."""
    if not 1 <= n <= max_batch:
        raise GptkitError(f"n={n} must be between 1 and the engine's max_batch={max_batch}")
    check_prompt(prompt, params.max_tokens, config)
    need = n * (len(prompt) + params.max_tokens)
    if need > max_cached_tokens:
        raise GptkitError(f"n={n} x (prompt of {_tokens(len(prompt))} + max_tokens {params.max_tokens}) = {need} "
                          f"tokens > the engine's max_cached_tokens={max_cached_tokens}")
    if params.stop and not has_token_bytes:
        raise GptkitError("stop strings need an engine built with token_bytes (e.g. tokenizer.token_bytes)")
    try:  # here, not at prefill: a request that cannot start must never hold rows
        return [s.encode("utf-8") for s in params.stop if s]
    except UnicodeEncodeError as e:
        raise GptkitError(f"stop string {e.object!r} is not valid Unicode text (a lone surrogate at "
                          f"position {e.start})") from None


def check_prompt(prompt: list[int], extra: int, config: ModelConfig) -> None:
    """GptkitError for a prompt the model cannot take with `extra` tokens to generate after it."""
    ctx, vocab = config.block_size, config.vocab_size
    if not prompt:
        raise GptkitError("prompt is empty: expected at least one token id")
    if len(prompt) + extra > ctx:
        raise GptkitError(f"prompt of {_tokens(len(prompt))} + max_tokens {extra} = {len(prompt) + extra} "
                          f"> context {ctx}")
    bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
    if bad is not None:
        raise GptkitError(f"token id {bad!r} in the prompt is outside the vocabulary [0, {vocab})")


# ------------------------------------------------------------------------------------ running samples
@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One running sample, held in cache row `slot` (rows 0..n-1 are the running ones)."""

    handle: RequestHandle
    index: int
    stops: list[bytes]
    stop_ids: set[int]
    next_token: int = -1  # sampled, not yet fed to the model
    n_out: int = 0  # tokens emitted
    out_bytes: bytearray = field(default_factory=bytearray)  # only kept when there are stop strings
    constraint: object = None  # gptkit.inference.constrain.Constraint for a structured-output row

    @property
    def params(self) -> SampleConfig:
        return self.handle.params

    def advance(self, tok: int, lp: float | None, top: dict | None, token_bytes: Callable[[int], bytes]) -> bool:
        """Emit the sampled token for this row; True when the row is finished."""
        if tok in self.stop_ids:
            self.handle._emit(Event(self.index, None, finish_reason="stop"))
            return True
        self.next_token, self.n_out = tok, self.n_out + 1
        reason, offset = None, None
        if self.stops:
            start = len(self.out_bytes)
            self.out_bytes += token_bytes(tok)
            offset = find_stop(self.out_bytes, self.stops, start)
            reason = "stop" if offset is not None else None
        if reason is None and self.n_out >= self.params.max_tokens:
            reason = "length"
        alive = self.handle._emit(Event(self.index, tok, lp, top, reason, offset))
        return reason is not None or not alive
