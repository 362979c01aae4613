"""The one inference engine: token ids in, token ids out, with continuous batching.

`generate`, `chat`, `evaluate` and the server all use it. It knows nothing about text:
stop strings are matched on bytes through `token_bytes`, and `TextStream` at the edges
(CLI, server) turns events into text deltas.

API
---
    engine = Engine(model, max_batch=8, max_cached_tokens=None, token_bytes=tok.token_bytes,
                    eos_ids=[tok.eot_id], device=None, dtype=None, quantize=None,
                    static_decode=None)   # None: static shapes + CUDA graphs on CUDA only
    handle = engine.submit(prompt_ids, SampleConfig(...), n=1)   # thread-safe; GptkitError if invalid
    for event in handle: ...          # blocking; ends after all n samples finished
    async for event in handle.aiter(): ...   # for an asyncio server (starts the scheduler thread)
    handle.cancel()                   # the request's slots are free at once (running drops now)
    handle.result() -> list[Completion]
    engine.generate(prompt_ids, params, n=1) -> list[Completion]   # blocking convenience
    engine.prompt_logprobs(prompts, top_k=0) -> per prompt, per token: (logprob | None, {id: logprob})
    engine.running, engine.queued     # requests admitted to the batch / waiting
    engine.start(), engine.shutdown() # background scheduler thread; without it, iterating a
                                      # handle or generate() drives the scheduler in the caller

    Event(index, token_id, logprob, top_logprobs, finish_reason, stop_text_offset)
    Completion(token_ids, finish_reason, logprobs, top_logprobs, stop_text_offset)
    TextStream(tokenizer, stop).push(event) -> str      # one per sample: safe text deltas
    completion_text(tokenizer, completion) -> str

Conventions
-----------
- A sample's events carry one token each; the last has a finish_reason: 'stop' (a stop
  token id, an eos id or a stop string), 'length' (max_tokens reached) or 'cancelled'.
- A stop token id or eos id ends the sample without being emitted: that final event has
  token_id None and the token is not in Completion.token_ids.
- A stop string ends the sample on the token that completes it; that token is emitted and
  kept in token_ids, and stop_text_offset says how many bytes of the decoded output to keep
  (the text is cut before the stop string).
- logprobs are those of the model's own distribution (log_softmax of the logits, before
  temperature, top-k/p and penalties): what a plain forward pass gives. With
  params.logprobs = k, each event has the chosen token's logprob and the top k alternatives.
- Sampling: temperature 0 is greedy; penalties follow OpenAI (logit -= frequency * count +
  presence * (count > 0), over generated tokens); each sample's randomness is a hash of its
  seed (seed + index when a seed is given), its step and the token id, so seeded requests are
  reproducible whatever else runs beside them. All rows are sampled at once by tensor ops
  (gptkit/sampling.py), with their parameters kept in device tensors per cache row.
- An error in one request (its prefill, sampling, stop matching or token decoding) fails that
  request alone: iterating its handle raises it, its rows and cache reservation are freed.
  Only a failing batched decode forward fails every request in flight.
"""

from __future__ import annotations

import asyncio
import codecs
import queue
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from gptkit.errors import GptkitError
from gptkit.config import SampleConfig
from gptkit.model.gpt import GPT, KVCache
from gptkit.model.quantize import prepare_model
from gptkit.inference.sampling import RowParams, SamplingError, sample_batch, top_dicts
from gptkit.inference.static_decode import StaticDecoder

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


# ------------------------------------------------------------------------------------ API types
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
    """One submitted request: events for all n samples, cancel, and the final completions."""

    def __init__(self, engine: "Engine", prompt: list[int], params: SampleConfig, n: int, stop_bytes: list[bytes]):
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


# ------------------------------------------------------------------------------------ stop strings
def find_stop(buf: bytes, stops: Sequence[bytes], start: int = 0) -> int | None:
    """Byte offset of the earliest stop string in buf that ends at or after `start`."""
    hits = [p for s in stops if (p := buf.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def stop_holdback(buf: bytes, stops: Sequence[bytes]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of a stop string:
    those bytes may still become a stop string, so they must not be shown yet."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Events of one sample -> text deltas that never split a UTF-8 character and never show
    bytes that may belong to a stop string. Used by generate, chat and the server alike."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.token_bytes: Callable[[int], bytes] = tokenizer.token_bytes
        self.stops = [s.encode("utf-8") for s in stop if s]
        self._buf = bytearray()
        self._sent = 0  # bytes handed to the UTF-8 decoder
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, event: Event) -> str:
        if event.token_id is not None:
            self._buf += self.token_bytes(event.token_id)
        if event.finish_reason is None:
            return self._release(len(self._buf) - stop_holdback(self._buf, self.stops), final=False)
        end = event.stop_text_offset if event.stop_text_offset is not None else len(self._buf)
        return self._release(end, final=True)

    def _release(self, end: int, final: bool) -> str:
        chunk = bytes(self._buf[self._sent:max(end, self._sent)])
        self._sent = max(end, self._sent)
        return self._utf8.decode(chunk, final=final)


def completion_text(tokenizer, completion: Completion) -> str:
    """The decoded text of a completion, cut before a matched stop string."""
    data = b"".join(tokenizer.token_bytes(t) for t in completion.token_ids)
    if completion.stop_text_offset is not None:
        data = data[:completion.stop_text_offset]
    return data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------ the engine
@dataclass(eq=False)  # rows are compared by identity
class _Row:
    """One running sample, held in cache row `slot` (rows 0..n-1 are the running ones)."""

    handle: RequestHandle
    index: int
    stops: list[bytes]
    stop_ids: set[int]
    next_token: int = -1  # sampled, not yet fed to the model
    n_out: int = 0  # tokens emitted
    out_bytes: bytearray = field(default_factory=bytearray)  # only kept when there are stop strings

    @property
    def params(self) -> SampleConfig:
        return self.handle.params


class Engine:
    """Continuous batching over one preallocated KV cache of `max_batch` rows.

    Running samples occupy cache rows 0..B-1 (kept contiguous: a finished row is replaced by
    the last one), so each decode step is one forward over a view of the cache. Queued
    requests are prefilled into free rows between steps and join the next decode step.
    """

    def __init__(self, model: GPT, *, max_batch: int = 8, max_cached_tokens: int | None = None,
                 token_bytes: Callable[[int], bytes] | None = None, eos_ids: Sequence[int] = (),
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 quantize: str | None = None, vocab_size: int | None = None, static_decode: bool | None = None):
        """vocab_size: how many ids the tokenizer can decode, when fewer than the model's
        (a vocabulary padded for speed, or an imported model's): the rest are never sampled.
        static_decode: decode with static shapes (gptkit/static_decode.py), as CUDA graphs on
        CUDA; None: on for CUDA without quantization, off elsewhere (on CPU the eager step,
        which attends only over the cached length, is faster)."""
        if max_batch < 1:
            raise GptkitError(f"max_batch={max_batch} must be at least 1")
        self.model = prepare_model(model, device=device, dtype=dtype, quantize=quantize)
        self.config = model.config
        self.device = next(self.model.parameters()).device
        self.max_batch = max_batch
        self.max_cached_tokens = max_cached_tokens or max_batch * self.config.block_size
        self.token_bytes, self.eos_ids = token_bytes, set(eos_ids)
        self.vocab_limit = min(vocab_size or self.config.vocab_size, self.config.vocab_size)
        cache_dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        self.cache = KVCache.allocate(self.config, max_batch, dtype=cache_dtype, device=self.device)
        self.sampling = RowParams.allocate(max_batch, self.vocab_limit, device=self.device)  # per cache row
        on_cuda = self.device.type == "cuda"
        if static_decode is None:
            static_decode = on_cuda and quantize is None
        self._static = StaticDecoder(self.model, self.cache, graphs=on_cuda) if static_decode else None
        self._rows: list[_Row] = []
        self._queue: list[RequestHandle] = []
        self._jobs: list[tuple[Future, Callable]] = []  # work for the scheduler thread (prompt_logprobs)
        self._active: set[RequestHandle] = set()  # admitted, not finished or cancelled
        self._reserved = 0  # cache tokens promised to admitted requests
        self._lock = threading.Lock()  # queue, _active, _reserved
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one scheduler step at a time (cache and rows)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seeds = random.SystemRandom()

    # --- public entry points (thread-safe)
    def submit(self, prompt: list[int], params: SampleConfig, n: int = 1) -> RequestHandle:
        handle = RequestHandle(self, list(prompt), params, n, self._validate(prompt, params, n))
        if params.max_tokens == 0:  # nothing to generate (echo/loglikelihood requests)
            handle._finish_all("length")
            return handle
        with self._wake:
            self._queue.append(handle)
            self._wake.notify()
        return handle

    def generate(self, prompt: list[int], params: SampleConfig, n: int = 1) -> list[Completion]:
        return self.submit(prompt, params, n).result()

    def prompt_logprobs(self, prompts: list[list[int]], top_k: int = 0) -> list[list[tuple[float | None, dict[int, float]]]]:
        """For each prompt token, its logprob given the tokens before it (None for the first)
        and the top_k alternatives there: the numbers of one plain forward pass. Runs on the
        scheduler thread when there is one (between two steps), else in the calling thread."""
        for prompt in prompts:
            self._check_tokens(prompt, extra=0)
        job: Future = Future()
        with self._wake:
            scheduled = self._thread_alive() and not self._stopping
            if scheduled:
                self._jobs.append((job, lambda: self._prompt_logprobs(prompts, top_k)))
                self._wake.notify()
        if not scheduled:
            with self._step_lock:
                return self._prompt_logprobs(prompts, top_k)
        return job.result()

    @torch.inference_mode()
    def _prompt_logprobs(self, prompts: list[list[int]], top_k: int) -> list[list[tuple[float | None, dict]]]:
        out = []
        for prompt in prompts:
            logits = self.model(torch.tensor([prompt], device=self.device))[0]  # (T, V)
            logp = F.log_softmax(logits.float(), dim=-1)
            chosen = logp[:-1].gather(1, torch.tensor(prompt[1:], device=self.device)[:, None])[:, 0].tolist()
            tops = top_dicts(logp[:-1], top_k) if top_k else [{} for _ in chosen]
            out.append([(None, {})] + list(zip(chosen, tops)))
        return out

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def reserved_tokens(self) -> int:
        """KV-cache positions promised to admitted requests (of max_cached_tokens)."""
        with self._lock:
            return self._reserved

    @property
    def queued_sequences(self) -> int:
        """Samples waiting for a row: what a queue limit should count (a request is n of them)."""
        with self._lock:
            return sum(h.n for h in self._queue)

    def start(self) -> None:
        """Run the scheduler in a background thread (idempotent)."""
        threads = _scheduler_threads or torch.get_num_threads()
        with self._lock:
            if self._thread_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, args=(threads,), name="gptkit-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the scheduler thread; every queued and running request ends 'cancelled'."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            handles = list(self._queue) + list(self._active)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for h in handles:
            h.cancel()
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for job, _ in jobs:
            job.set_exception(GptkitError("the engine shut down before this request ran"))

    # --- validation
    def _validate(self, prompt: list[int], params: SampleConfig, n: int) -> list[bytes]:
        """GptkitError for a request the engine cannot run; else its stop strings as UTF-8."""
        if not 1 <= n <= self.max_batch:
            raise GptkitError(f"n={n} must be between 1 and the engine's max_batch={self.max_batch}")
        self._check_tokens(prompt, extra=params.max_tokens)
        need = n * (len(prompt) + params.max_tokens)
        if need > self.max_cached_tokens:
            raise GptkitError(f"n={n} x (prompt of {len(prompt)} tokens + max_tokens {params.max_tokens}) = {need} "
                              f"tokens > the engine's max_cached_tokens={self.max_cached_tokens}")
        if params.stop and self.token_bytes is None:
            raise GptkitError("stop strings need an engine built with token_bytes (e.g. tokenizer.token_bytes)")
        try:  # here, not at prefill: a request that cannot start must never hold rows
            return [s.encode("utf-8") for s in params.stop if s]
        except UnicodeEncodeError as e:
            raise GptkitError(f"stop string {e.object!r} is not valid Unicode text (a lone surrogate at "
                              f"position {e.start})") from None

    def _check_tokens(self, prompt: list[int], extra: int) -> None:
        ctx, vocab = self.config.block_size, self.config.vocab_size
        if not prompt:
            raise GptkitError("prompt is empty: expected at least one token id")
        if len(prompt) + extra > ctx:
            raise GptkitError(f"prompt of {len(prompt)} tokens + max_tokens {extra} = {len(prompt) + extra} "
                              f"> context {ctx}")
        bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise GptkitError(f"token id {bad!r} in the prompt is outside the vocabulary [0, {vocab})")

    # --- scheduler
    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self, threads: int) -> None:
        torch.set_num_threads(threads)
        while True:
            with self._wake:
                while not (self._stopping or self._queue or self._active or self._rows or self._jobs):
                    self._wake.wait()
                if self._stopping:
                    return
                jobs, self._jobs = self._jobs, []
            for job, fn in jobs:
                try:
                    job.set_result(fn())
                except Exception as e:
                    job.set_exception(e)
            try:
                self.step()
            except Exception:  # step() already failed the requests in flight; keep serving
                pass

    def _drive_until(self, done: threading.Event, timeout: float | None) -> None:
        """Wait for `done`, running scheduler steps in this thread when no scheduler thread runs."""
        while not done.is_set():
            if self._thread_alive():
                if not done.wait(timeout if timeout is not None else 0.1) and timeout is not None:
                    raise TimeoutError("request did not finish in time")
            else:
                self.step()

    def step(self) -> None:
        """One scheduling step: drop cancelled rows, admit queued requests (prefill), then one
        decode step for every running row. Safe to call from any thread."""
        with self._step_lock, torch.inference_mode():
            try:
                self._drop_rows([i for i, r in enumerate(self._rows) if r.handle.cancelled])
                self._admit()
                if self._rows:
                    self._decode()
            except Exception as e:  # fail the requests in flight, keep the engine usable
                self._fail_all(e)
                raise

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                h = self._queue[0]
                if len(self._rows) + h.n > self.max_batch or self._reserved + h.need > self.max_cached_tokens:
                    return  # first come, first served: wait for rows to free up
                self._queue.pop(0)
                self._active.add(h)
                self._reserved += h.need
            try:
                self._prefill(h)
            except Exception as e:  # this request alone fails; its rows and reservation are freed
                self._fail_request(h, e)

    def _prefill(self, h: RequestHandle) -> None:
        """Prefill the prompt once into a free row, copy it to the n-1 rows after it, and
        sample each sample's first token from the same logits."""
        slot = len(self._rows)
        view = self.cache.rows(slot, slot + 1)
        view.reset()
        logits = self.model(torch.tensor([h.prompt], device=self.device), kv_cache=view, last_only=True)[:, -1]
        for i in range(1, h.n):
            self._copy_row(slot, slot + i)
        for i in range(h.n):
            self.sampling.set(slot + i, h.params, h.params.seed + i if h.params.seed is not None
                              else self._seeds.getrandbits(63))
        stop_ids = self.eos_ids | set(h.params.stop_token_ids)
        self._rows.extend(_Row(h, i, h.stop_bytes, stop_ids) for i in range(h.n))
        self._sample_and_emit(logits.expand(h.n, -1), start=slot)

    def _decode(self) -> None:
        tokens = [r.next_token for r in self._rows]
        if self._static is not None:
            logits = self._static(tokens)
        else:
            idx = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
            logits = self.model(idx, kv_cache=self.cache.rows(0, len(tokens)), last_only=True)[:, -1]  # (B, V)
        self._sample_and_emit(logits, start=0)

    def _sample_and_emit(self, logits: torch.Tensor, start: int) -> None:
        """Sample for rows start.. (one logits row each), emit their events, drop finished rows."""
        rows = self._rows[start:]
        logits = logits[:, :self.vocab_limit].float()  # ids the tokenizer cannot decode are never drawn
        params = self.sampling.rows(start, start + len(rows))
        tokens, bad = sample_batch(logits, params)
        params.advance(tokens)
        token_list, bad_list = torch.stack([tokens, bad.long()]).tolist()  # the step's one host sync
        errors = {i: SamplingError("the next-token distribution is not finite (NaN or infinite logits)")
                  for i, b in enumerate(bad_list) if b}
        k = max((r.params.logprobs or 0) for r in rows)
        want_lp = [r.params.logprobs is not None for r in rows]
        chosen, tops = [None] * len(rows), [None] * len(rows)
        if any(want_lp):
            logp = F.log_softmax(logits, dim=-1)
            chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
            if k:
                tops = top_dicts(logp, k)
        finished, failed = [], {}
        for i, (row, tok) in enumerate(zip(rows, token_list)):
            lp = chosen[i] if want_lp[i] else None
            top = dict(list(tops[i].items())[:row.params.logprobs]) if tops[i] is not None and row.params.logprobs else None
            try:
                if i in errors or self._advance(row, tok, lp, top):
                    finished.append(start + i)
            except Exception as e:  # stop matching or decoding failed: only this request fails
                errors[i] = e
            if i in errors:
                failed.setdefault(row.handle, errors[i])
        self._drop_rows(finished)
        for h, e in failed.items():
            self._fail_request(h, e)

    def _advance(self, row: _Row, tok: int, lp: float | None, top: dict | None) -> bool:
        """Emit the sampled token for one row; True when the row is finished."""
        if tok in row.stop_ids:
            row.handle._emit(Event(row.index, None, finish_reason="stop"))
            return True
        row.next_token, row.n_out = tok, row.n_out + 1
        reason, offset = None, None
        if row.stops:
            start = len(row.out_bytes)
            row.out_bytes += self.token_bytes(tok)
            offset = find_stop(row.out_bytes, row.stops, start)
            reason = "stop" if offset is not None else None
        if reason is None and row.n_out >= row.params.max_tokens:
            reason = "length"
        alive = row.handle._emit(Event(row.index, tok, lp, top, reason, offset))
        return reason is not None or not alive

    def _drop_rows(self, indices: list[int]) -> None:
        """Free rows, keeping the running ones contiguous: move the last row into each hole."""
        for i in sorted(indices, reverse=True):
            row = self._rows[i]
            last = len(self._rows) - 1
            if i != last:
                self._copy_row(last, i)
                self._rows[i] = self._rows[last]
            self._rows.pop()
            self.cache.lengths[last] = 0
            self._release(row.handle)

    def _release(self, h: RequestHandle) -> None:
        """Give back a request's reservation once none of its rows is left (once)."""
        if h.released or any(r.handle is h for r in self._rows):
            return
        with self._lock:
            h.released = True
            self._active.discard(h)
            self._reserved -= h.need

    def _fail_request(self, h: RequestHandle, error: Exception) -> None:
        """End one request with an error: its rows go, its reservation is given back."""
        if not h.done:
            h._fail(error)  # first: a row dropped below can no longer emit
        self._drop_rows([i for i, r in enumerate(self._rows) if r.handle is h])
        self._release(h)

    def _copy_row(self, src: int, dst: int) -> None:
        n = self.cache.lengths[src]
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]
        self.cache.lengths[dst] = n
        self.sampling.copy_row(src, dst)

    def _cancel(self, h: RequestHandle) -> None:
        with self._wake:
            if h.done:
                return
            h.cancelled = True
            if h in self._queue:
                self._queue.remove(h)
            self._active.discard(h)  # running drops now; its rows go before the next forward
            self._wake.notify()
        h._finish_all("cancelled")

    def _fail_all(self, error: Exception) -> None:
        handles = {r.handle for r in self._rows}
        self._rows.clear()
        self.cache.reset()
        with self._lock:
            self._active -= handles
            self._reserved = sum(h.need for h in self._active)
            for h in handles:
                h.released = True
        for h in handles:
            h._fail(error)
