"""The one inference engine: token ids in, token ids out, with continuous batching.

`generate`, `chat`, `evaluate` and the server all use it. It knows nothing about text:
stop strings are matched on bytes through `token_bytes`, and `TextStream` at the edges
(CLI, server) turns events into text deltas.

API
---
    engine = Engine(model, max_batch=8, max_cached_tokens=None, token_bytes=tok.token_bytes,
                    eos_ids=[tok.eot_id], device=None, dtype=None, quantize=None,
                    static_decode=None,   # None: static shapes + CUDA graphs on CUDA only
                    prefix_cache_bytes=0) # >0: reuse the KV entries of prompt prefixes (prefix_cache.py)
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

    # gptkit/inference/requests.py, with RequestHandle (the handle above)
    Event(index, token_id, logprob, top_logprobs, finish_reason, stop_text_offset)
    Completion(token_ids, finish_reason, logprobs, top_logprobs, stop_text_offset)
    # gptkit/text/stream.py
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
  (gptkit/inference/sampling.py), with their parameters kept in device tensors per cache row.
- An error in one request (its prefill, sampling, stop matching or token decoding) fails that
  request alone: iterating its handle raises it, its rows and cache reservation are freed.
  Only a failing batched decode forward fails every request in flight.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import Future
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from gptkit.errors import GptkitError
from gptkit.config import SampleConfig
from gptkit.model.gpt import GPT, KVCache
from gptkit.model.quantize import prepare_model
from gptkit.inference.constrain import Constraint, GrammarVocab, apply_masks
from gptkit.inference.prefix_cache import PrefixCache
from gptkit.inference.requests import Completion, RequestHandle, Row, check_prompt, check_request
from gptkit.inference.sampling import RowParams, SamplingError, sample_batch, top_dicts
from gptkit.inference.static_decode import StaticDecoder
from gptkit.inference.threads import scheduler_threads

# ------------------------------------------------------------------------------------ the engine
class Engine:
    """Continuous batching over one preallocated KV cache of `max_batch` rows.

    Running samples occupy cache rows 0..B-1 (kept contiguous: a finished row is replaced by
    the last one), so each decode step is one forward over a view of the cache. Queued
    requests are prefilled into free rows between steps and join the next decode step.
    """

    def __init__(self, model: GPT, *, max_batch: int = 8, max_cached_tokens: int | None = None,
                 token_bytes: Callable[[int], bytes] | None = None, eos_ids: Sequence[int] = (),
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 quantize: str | None = None, vocab_size: int | None = None, static_decode: bool | None = None,
                 grammar_vocab: GrammarVocab | None = None, prefix_cache_bytes: int = 0):
        """vocab_size: how many ids the tokenizer can decode, when fewer than the model's
        (a vocabulary padded for speed, or an imported model's): the rest are never sampled.
        static_decode: decode with static shapes (gptkit/inference/static_decode.py), as CUDA graphs on
        CUDA; None: on for CUDA without quantization, off elsewhere (on CPU the eager step,
        which attends only over the cached length, is faster).
        prefix_cache_bytes: keep the KV entries of prompt prefixes up to this size for later
        requests that start alike (gptkit/inference/prefix_cache.py); 0: off."""
        if max_batch < 1:
            raise GptkitError(f"max_batch={max_batch} must be at least 1")
        self.model = prepare_model(model, device=device, dtype=dtype, quantize=quantize, max_batch=max_batch)
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
        self._rows: list[Row] = []
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
        self.grammar_vocab = grammar_vocab  # the tokenizer as the grammar matcher sees it (structured outputs)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None

    # --- public entry points (thread-safe)
    def submit(self, prompt: list[int], params: SampleConfig, n: int = 1) -> RequestHandle:
        stop_bytes = check_request(prompt, params, n, config=self.config, max_batch=self.max_batch,
                                   max_cached_tokens=self.max_cached_tokens,
                                   has_token_bytes=self.token_bytes is not None)
        handle = RequestHandle(self, list(prompt), params, n, stop_bytes)
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
            check_prompt(prompt, 0, self.config)
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
        threads = scheduler_threads()
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
        cached = self.prefix_cache.restore(self.cache, slot, h.prompt) if self.prefix_cache else 0
        self.cache.lengths[slot] = cached
        view = self.cache.rows(slot, slot + 1)
        logits = self.model(torch.tensor([h.prompt[cached:]], device=self.device), kv_cache=view, last_only=True)[:, -1]
        if self.prefix_cache:
            self.prefix_cache.store(self.cache, slot, h.prompt)
        for i in range(1, h.n):
            self._copy_row(slot, slot + i)
        for i in range(h.n):
            self.sampling.set(slot + i, h.params, h.params.seed + i if h.params.seed is not None
                              else self._seeds.getrandbits(63))
        stop_ids = self.eos_ids | set(h.params.stop_token_ids)
        constraints = [self._constraint(h.params) for _ in range(h.n)]  # before any row joins: may raise
        self._rows.extend(Row(h, i, h.stop_bytes, stop_ids, constraint=c) for i, c in enumerate(constraints))
        self._sample_and_emit(logits.expand(h.n, -1), start=slot)

    def _constraint(self, params: SampleConfig) -> Constraint | None:
        if params.grammar is None:
            return None
        if self.grammar_vocab is None:
            raise GptkitError("this engine has no tokenizer for grammars (build it with gptkit.inference.factory)")
        return Constraint(self.grammar_vocab, params.grammar)

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
        constraints = [r.constraint for r in rows]
        if any(c is not None for c in constraints):  # structured-output rows: what their grammar forbids is -inf
            logits = apply_masks(logits, constraints)
        params = self.sampling.rows(start, start + len(rows))
        tokens, bad = sample_batch(logits, params)
        params.advance(tokens)
        token_list, bad_list = torch.stack([tokens, bad.long()]).tolist()  # the step's one host sync
        for c, tok in zip(constraints, token_list):
            if c is not None:
                c.consume(tok)
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
                if i in errors or row.advance(tok, lp, top, self.token_bytes):
                    finished.append(start + i)
            except Exception as e:  # stop matching or decoding failed: only this request fails
                errors[i] = e
            if i in errors:
                failed.setdefault(row.handle, errors[i])
        self._drop_rows(finished)
        for h, e in failed.items():
            self._fail_request(h, e)

    def _drop_rows(self, indices: list[int]) -> None:
        """Free rows, keeping the running ones contiguous: move the last row into each hole."""
        for i in sorted(indices, reverse=True):
            row = self._rows[i]
            if self.prefix_cache and row.handle.error is None:  # the next turn of a chat resends this reply
                self.prefix_cache.store(self.cache, i, row.handle.prompt + row.handle._partial[row.index].token_ids)
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
