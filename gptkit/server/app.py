"""The OpenAI-compatible app: `create_app([ServedModel(name, engine, tokenizer), ...], ServerConfig())`.

Each model has one Engine whose scheduler thread runs the batch; handlers only submit token
ids and consume events with `handle.aiter()`, so the event loop never blocks on the model.
Text enters through the tokenizer (`encode`, `render_chat`) and leaves through `TextStream`,
which never splits a UTF-8 character nor shows the start of a stop string.

    /v1/models, /v1/models/{id}, /v1/completions, /v1/chat/completions   OpenAI's API
    /tokenize, /detokenize, /tokenizer_info                              for evaluation harnesses
    /v1/moderations                                                      with --moderation (moderation.py)
    /v1/attention                                     gptkit's extension: attention weights (attention.py)
    /health                                                              open even with API keys (auth.py)
    /, /chat, /static/...                                 the chat page, open even with a key (webui.py)
"""

from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from prometheus_client import CONTENT_TYPE_LATEST

from gptkit.config import SampleConfig
from gptkit.inference.engine import Engine, Event, RequestHandle, TextStream
from gptkit.server import schemas as S
from gptkit.server.attention import attention_routes
from gptkit.server.audit import AuditLog
from gptkit.server.auth import ApiKey, KeyAuth, KeyRing, check_model, hash_key, is_open, model_allowed
from gptkit.server.context import RequestContext, current_request
from gptkit.server.errors import APIError, error_body, install_handlers, log
from gptkit.server.limits import BodyLimit, Limits, check_queue
from gptkit.server.metrics import Metrics, RequestMetrics
from gptkit.server.moderation import Moderator, moderation_routes
from gptkit.server.ratelimit import WINDOW_S
from gptkit.server.webui import mount_page
from gptkit.text.tokenizer import EOT, Tokenizer, render_chat, use_chat_template

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
ERROR_RESPONSES = {s: {"model": S.ErrorResponse} for s in (400, 401, 404, 413, 429)}
# with stream=true each server-sent event (as a client parses it) is one object whose data is a JSON chunk or [DONE]
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}
SSE_RESPONSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                      "description": "JSON, or with stream=true server-sent events of chunks ending in [DONE]"}}


@dataclass
class ServedModel:
    name: str
    engine: Engine
    tokenizer: Tokenizer
    created: int = field(default_factory=lambda: int(time.time()))
    chat_template: str = "auto"  # auto | chatml | plain; after __post_init__, where the template came from

    def __post_init__(self) -> None:
        self.chat_template = use_chat_template(self.tokenizer, self.chat_template)

    @property
    def context(self) -> int:
        return self.engine.config.block_size

    @property
    def vocab(self) -> int:
        """Ids both the model and the tokenizer know."""
        return min(self.engine.config.vocab_size, self.tokenizer.vocab_size)

    def card(self) -> S.ModelCard:
        return S.ModelCard(id=self.name, created=self.created, max_model_len=self.context)


@dataclass
class ServerConfig:
    api_key: str | None = None  # one key, named "default"; with api_keys: also none needed when both are empty
    api_keys: list[ApiKey] = field(default_factory=list)  # from --api-keys-file
    public_metrics: bool = False  # /metrics open even with keys
    limit_window_s: float = WINDOW_S  # the "minute" of the rate limits (shorter only in tests)
    audit: AuditLog | None = None
    moderator: Moderator | None = None
    max_queue: int = 64  # sequences (prompts x n) waiting for a batch row, per model, before 429
    max_body: int = 4 * 2**20  # bytes, before 413
    limits: Limits = field(default_factory=Limits)  # what one request may cost (limits.py)


# ------------------------------------------------------------------------------------ text edges
def token_text(tok: Tokenizer, token_id: int) -> str:
    """A token as text; a piece of a UTF-8 character is written as OpenAI does, `bytes:\\xe6`."""
    data = tok.token_bytes(token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def encode_prompts(served: ServedModel, prompt: str | list, limits: Limits) -> list[list[int]]:
    """OpenAI's four prompt shapes -> one list of token ids per prompt. Special tokens' text
    in a prompt is encoded as the special token (lm-evaluation-harness relies on it)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        limits.check_prompts(len(prompt))
    if isinstance(prompt, str):
        prompts = [served.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = served.tokenizer.encode_batch(list(prompt))
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt is empty: expected text or at least one token id", param="prompt")
    check_ids(served, [t for p in prompts for t in p], "prompt")
    return prompts


def check_ids(served: ServedModel, ids: Iterable[int], param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < served.vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {served.vocab})", param=param)


# ------------------------------------------------------------------------------------ logprobs
def completion_logprobs(tok: Tokenizer, entries: list[tuple[int, float | None, dict[int, float] | None]],
                        offset: int = 0) -> S.CompletionLogprobs:
    """The legacy logprobs object from (token id, logprob, top alternatives) entries; the
    chosen token is always among its position's top_logprobs (so up to k + 1 of them)."""
    out = S.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tid, lp, top in entries:
        out.tokens.append(token_text(tok, tid))
        out.token_logprobs.append(lp)
        alternatives = None if lp is None else {**(top or {}), tid: lp}
        out.top_logprobs.append(None if alternatives is None else
                                {token_text(tok, t): v for t, v in alternatives.items()})
        out.text_offset.append(offset)
        offset += len(utf8.decode(tok.token_bytes(tid)))
    return out


def chat_logprobs(tok: Tokenizer, entries: list[tuple[int, float | None, dict[int, float] | None]]) -> S.ChatLogprobs:
    def top(t: int, lp: float) -> S.TopLogprob:
        return S.TopLogprob(token=token_text(tok, t), logprob=lp, bytes=list(tok.token_bytes(t)))

    return S.ChatLogprobs(content=[S.TokenLogprob(**top(t, lp).model_dump(),
                                                  top_logprobs=[top(a, v) for a, v in (alts or {}).items()])
                                   for t, lp, alts in entries])


# ------------------------------------------------------------------------------------ generation
@dataclass
class Choice:
    """What one choice (prompt x sample) has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[dict[int, float] | None] = field(default_factory=list)
    finish_reason: str | None = None

    def entries(self) -> list[tuple[int, float | None, dict[int, float] | None]]:
        return list(zip(self.token_ids, self.logprobs, self.tops))


class Generation:
    """One request's engine handles (one per prompt, n samples each) as one stream of
    (choice index, event, text delta), with index = prompt_index * n + sample_index as OpenAI
    numbers choices. Whatever ends it early (client gone, error) cancels what is left."""

    def __init__(self, served: ServedModel, handles: list[RequestHandle], prompts: list[list[int]], n: int,
                 stop: list[str], metrics: Metrics, started: float):
        self.served, self.handles, self.prompts, self.n = served, handles, prompts, n
        self.metrics, self.started = metrics, started
        self.choices = [Choice() for _ in range(len(handles) * n)]
        self._streams = [TextStream(served.tokenizer, stop) for _ in self.choices]
        self._first_token = True
        self._closed = False
        self.record = current_request()
        self.guard: Moderator | None = None  # output moderation

    def events(self) -> AsyncIterator[tuple[int, Event, str]]:
        raw = self._events()
        return self.guard.guard(self, raw) if self.guard else raw

    async def _events(self) -> AsyncIterator[tuple[int, Event, str]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, handle: RequestHandle) -> None:
            try:
                async for ev in handle.aiter():
                    queue.put_nowait((p, ev))
            except Exception as e:  # an engine failure: hand it to the consumer
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(p, h)) for p, h in enumerate(self.handles)]
        remaining = len(self.choices)
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                p, ev = item
                i = p * self.n + ev.index
                remaining -= ev.finish_reason is not None
                yield i, ev, self._record(i, ev)
        finally:
            for t in tasks:
                t.cancel()
            self.close()

    async def run(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    def close(self) -> None:
        """Cancel unfinished samples: their batch slots are free at once."""
        if self._closed:
            return
        self._closed = True
        if any(c.finish_reason is None for c in self.choices):
            self.metrics.cancelled.labels(self.served.name).inc()
        for h in self.handles:
            h.cancel()
        if self.record.want_text:
            self.record.completion_text = [c.text for c in self.choices]

    def usage(self) -> S.Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _record(self, i: int, ev: Event) -> str:
        if ev.finish_reason == "cancelled":  # only the engine shutting down cancels on its own
            raise APIError(503, "the server is shutting down; retry on another instance")
        c = self.choices[i]
        if ev.token_id is not None:
            c.token_ids.append(ev.token_id)
            c.logprobs.append(ev.logprob)
            c.tops.append(ev.top_logprobs)
            self.metrics.generated_tokens.labels(self.served.name).inc()
            self.record.add_tokens(completion=1)
            if self._first_token:
                self._first_token = False
                self.metrics.ttft.labels(self.served.name).observe(time.perf_counter() - self.started)
        delta = self._streams[i].push(ev)
        c.text += delta
        c.finish_reason = ev.finish_reason or c.finish_reason
        return delta


class EventStream(StreamingResponse):
    """Server-sent events of one generation. Starlette cancels the body when the client
    disconnects; closing the generation here as well frees its slots however the stream ends."""

    def __init__(self, chunks: AsyncIterator[BaseModel], generation: Generation):
        super().__init__(_sse(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def _sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """`data: <json>` events, then `data: [DONE]`; an error after the stream began is an event
    with an `error` key, as OpenAI sends it."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except APIError as e:
        yield _error_event(error_body(e.status_code, e.detail, e.param, e.code))
    except Exception as e:
        log.exception("error while streaming")
        yield _error_event(error_body(500, f"internal server error ({type(e).__name__})"))
    yield "data: [DONE]\n\n"


def _error_event(body: dict) -> str:
    return f"data: {S.ErrorResponse(**body).model_dump_json()}\n\n"


def sample_config(body: S.SamplingRequest, max_tokens: int, logprobs: int | None) -> SampleConfig:
    return SampleConfig(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                        stop=list(body.stop), seed=body.seed, logprobs=logprobs)


# ------------------------------------------------------------------------------------ the app state
class Server:
    """The models, limits and metrics the handlers share."""

    def __init__(self, models: list[ServedModel], config: ServerConfig):
        if not models:
            raise ValueError("serve at least one model")
        self.models = {m.name: m for m in models}
        self.config = config
        self.metrics = Metrics()
        self.keys = KeyRing(config.api_keys + ([ApiKey("default", hash_key(config.api_key))] if config.api_key else []),
                            config.limit_window_s)
        self.moderator = config.moderator

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            name = next((m for m in self.models if model_allowed(m)), next(iter(self.models)))
        if name not in self.models:
            raise APIError(404, f"model {name!r} not found; this server has: "
                           f"{', '.join(m for m in self.models if model_allowed(m))}",
                           param="model", code="model_not_found")
        check_model(name)
        current_request().model = name
        return self.models[name]

    async def moderate_input(self, texts: list[str], param: str) -> None:
        if self.moderator is not None:
            await self.moderator.check_input(texts, param)

    def generate(self, served: ServedModel, prompts: list[list[int]], params: SampleConfig, n: int) -> Generation:
        """Submit one engine request per prompt, or 429 when the model's queue is full."""
        started = time.perf_counter()
        engine = served.engine
        check_queue(served.name, engine.queued_sequences, len(prompts) * n, self.config.max_queue)
        handles: list[RequestHandle] = []
        try:
            for p in prompts:
                handles.append(engine.submit(p, params, n))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        self.metrics.prompt_tokens.labels(served.name).inc(sum(len(p) for p in prompts))
        gen = Generation(served, handles, prompts, n, params.stop, self.metrics, started)
        gen.record.add_tokens(prompt=sum(len(p) for p in prompts))
        if gen.record.want_text:
            gen.record.prompt_text = [served.tokenizer.decode(p) for p in prompts]
        if self.moderator is not None and self.moderator.cfg.moderate_output:
            gen.guard = self.moderator
        return gen


# ------------------------------------------------------------------------------------ /v1/completions
def _head(prefix: str, served: ServedModel) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}


async def completions(server: Server, body: S.CompletionRequest) -> S.Completion | EventStream:
    served = server.model(body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of={body.best_of} must equal n={body.n}: gptkit does not rank extra samples",
                       param="best_of")
    limits = server.config.limits
    limits.check_stop(body.stop)
    prompts = encode_prompts(served, body.prompt, limits)
    limits.check_tokens(len(prompts), body.n, body.max_tokens)
    await server.moderate_input([served.tokenizer.decode(p) for p in prompts], "prompt")
    gen = server.generate(served, prompts, sample_config(body, body.max_tokens, body.logprobs), body.n)
    try:
        echoes = await _echoes(served, prompts, body) if body.echo else None
    except BaseException:
        gen.close()
        raise
    head = _head("cmpl", served)
    if body.stream:
        return EventStream(_completion_chunks(gen, head, echoes, body), gen)
    choices = await gen.run()
    return S.Completion(**head, usage=gen.usage(), choices=[
        _completion_choice(served, i, c, echoes[i // body.n] if echoes else None, body.logprobs)
        for i, c in enumerate(choices)])


@dataclass
class Echo:
    """A prompt as echoed: its text and, with logprobs, one entry per prompt token."""

    text: str
    entries: list[tuple[int, float | None, dict[int, float] | None]]


async def _echoes(served: ServedModel, prompts: list[list[int]], body: S.CompletionRequest) -> list[Echo]:
    tok = served.tokenizer
    if body.logprobs is None:
        return [Echo(tok.decode(p), []) for p in prompts]
    # one plain forward pass per prompt, off the event loop
    scored = await asyncio.to_thread(served.engine.prompt_logprobs, prompts, body.logprobs)
    return [Echo(tok.decode(p), [(t, lp, top) for t, (lp, top) in zip(p, s)]) for p, s in zip(prompts, scored)]


def _completion_choice(served: ServedModel, index: int, c: Choice, echo: Echo | None,
                       logprobs: int | None) -> S.CompletionChoice:
    prefix = echo.text if echo else ""
    lp = None
    if logprobs is not None:
        lp = completion_logprobs(served.tokenizer, (echo.entries if echo else []) + c.entries())
    return S.CompletionChoice(index=index, text=prefix + c.text, finish_reason=c.finish_reason, logprobs=lp)


async def _completion_chunks(gen: Generation, head: dict, echoes: list[Echo] | None,
                             body: S.CompletionRequest) -> AsyncIterator[S.Completion]:
    tok = gen.served.tokenizer
    if echoes:
        for i in range(len(gen.choices)):
            echo = echoes[i // body.n]
            lp = completion_logprobs(tok, echo.entries) if body.logprobs is not None else None
            yield S.Completion(**head, choices=[S.CompletionChoice(index=i, text=echo.text, logprobs=lp)])
    async for i, ev, delta in gen.events():
        lp = None
        if body.logprobs is not None and ev.token_id is not None:
            start = len(gen.choices[i].text) - len(delta) + (len(echoes[i // body.n].text) if echoes else 0)
            lp = completion_logprobs(tok, [(ev.token_id, ev.logprob, ev.top_logprobs)], start)
        if delta or lp or ev.finish_reason:
            yield S.Completion(**head, choices=[S.CompletionChoice(index=i, text=delta, logprobs=lp,
                                                                   finish_reason=ev.finish_reason)])
    if body.include_usage:
        yield S.Completion(**head, choices=[], usage=gen.usage())


# ------------------------------------------------------------------------------------ /v1/chat/completions
async def chat_completions(server: Server, body: S.ChatCompletionRequest) -> S.ChatCompletion | EventStream:
    served = server.model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
    limits = server.config.limits
    limits.check_stop(body.stop)
    ids, _ = render_chat(served.tokenizer, messages)
    await server.moderate_input([m["content"] for m in messages], "messages")
    # default: the rest of the context (at least 1, so a full context is a 400 naming both numbers)
    max_tokens = (body.max_completion_tokens or body.max_tokens
                  or limits.default_max_tokens(served.context - len(ids), body.n))
    limits.check_tokens(1, body.n, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sample_config(body, max_tokens, logprobs)
    params.stop += served.tokenizer.chat_template.stop  # the plain template ends at the next role marker
    gen = server.generate(served, [ids], params, body.n)
    head = _head("chatcmpl", served)
    if body.stream:
        return EventStream(_chat_chunks(gen, head, body), gen)
    choices = await gen.run()
    tok = served.tokenizer
    return S.ChatCompletion(**head, usage=gen.usage(), choices=[
        S.ChatChoice(index=i, message=S.AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                     logprobs=chat_logprobs(tok, c.entries()) if body.logprobs else None)
        for i, c in enumerate(choices)])


async def _chat_chunks(gen: Generation, head: dict,
                       body: S.ChatCompletionRequest) -> AsyncIterator[S.ChatCompletionChunk]:
    def chunk(i: int, delta: S.ChatDelta, finish: str | None = None, lp: S.ChatLogprobs | None = None):
        return S.ChatCompletionChunk(**head, choices=[S.ChatChunkChoice(index=i, delta=delta, finish_reason=finish,
                                                                        logprobs=lp)])

    for i in range(len(gen.choices)):  # each choice opens with the role, as OpenAI's stream does
        yield chunk(i, S.ChatDelta(role="assistant", content=""))
    tok = gen.served.tokenizer
    async for i, ev, delta in gen.events():
        lp = chat_logprobs(tok, [(ev.token_id, ev.logprob, ev.top_logprobs)]) \
            if body.logprobs and ev.token_id is not None else None
        if delta or lp:
            yield chunk(i, S.ChatDelta(content=delta), lp=lp)
        if ev.finish_reason:
            yield chunk(i, S.ChatDelta(), ev.finish_reason)
    if body.include_usage:
        yield S.ChatCompletionChunk(**head, choices=[], usage=gen.usage())


# ------------------------------------------------------------------------------------ the app
def create_app(models: list[ServedModel], config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving `models`; their engines' scheduler threads run while it runs."""
    server = Server(models, config or ServerConfig())

    cfg = server.config
    secured = bool(server.keys.keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for m in server.models.values():
            m.engine.start()
        if cfg.audit:
            cfg.audit.start()
        yield
        for m in server.models.values():
            m.engine.shutdown()
        if cfg.audit:
            cfg.audit.close()

    # /docs and /redoc load their JavaScript from a CDN: off when keys are set (auth.py)
    docs = {"docs_url": None, "redoc_url": None} if secured else {}
    app = FastAPI(title="gptkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for gptkit checkpoints", **docs)
    app.state.server = server
    install_handlers(app)
    app.include_router(_routes(server))
    app.include_router(moderation_routes(server.moderator, ERROR_RESPONSES))
    app.include_router(attention_routes(server))
    mount_page(app)
    # the last added runs first: count every response, open its record, check the key and its
    # limits, then the body size
    app.add_middleware(BodyLimit, max_body=cfg.max_body)
    app.add_middleware(KeyAuth, ring=server.keys if secured else None, public_metrics=cfg.public_metrics,
                       on_limited=lambda key, limit: server.metrics.key_rate_limited.labels(key, limit).inc())
    app.add_middleware(RequestContext, sinks=[server.metrics.record_key] + ([cfg.audit.log] if cfg.audit else []),
                       want_text=bool(cfg.audit and cfg.audit.text))
    app.add_middleware(RequestMetrics, metrics=server.metrics)
    app.openapi = lambda: _openapi(app, secured=secured, public_metrics=cfg.public_metrics)
    return app


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await a request's work, but cancel it (its samples leave the queue or the batch at once)
    when the client goes away first. A stream returns at once and is watched by EventStream."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"


def _routes(server: Server) -> APIRouter:
    router = APIRouter()
    v1 = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

    @v1.get("/models", response_model=S.ModelList)
    async def list_models() -> S.ModelList:
        return S.ModelList(data=[m.card() for m in server.models.values() if model_allowed(m.name)])

    @v1.get("/models/{model_id:path}", response_model=S.ModelCard)
    async def get_model(model_id: str) -> S.ModelCard:
        return server.model(model_id).card()

    @v1.post("/completions", response_model=S.Completion, responses=SSE_RESPONSE)
    async def create_completion(body: S.CompletionRequest, request: Request):
        return await _unless_disconnected(request, completions(server, body))

    @v1.post("/chat/completions", response_model=S.ChatCompletion, responses=SSE_RESPONSE)
    async def create_chat_completion(body: S.ChatCompletionRequest, request: Request):
        return await _unless_disconnected(request, chat_completions(server, body))

    @router.get("/health", response_model=S.Health)
    async def health() -> S.Health:
        return S.Health(models={name: S.EngineLoad(running=m.engine.running, queued=m.engine.queued,
                                                   max_batch=m.engine.max_batch,
                                                   cached_tokens=m.engine.reserved_tokens,
                                                   max_cached_tokens=m.engine.max_cached_tokens)
                                for name, m in server.models.items()})

    @router.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    async def metrics() -> Response:
        loads = {name: (m.engine.running, m.engine.queued) for name, m in server.models.items()}
        return Response(server.metrics.render(loads), media_type=CONTENT_TYPE_LATEST)

    @router.post("/tokenize", response_model=S.TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: S.TokenizeRequest) -> S.TokenizeResponse:
        served = server.model(body.model)
        ids = served.tokenizer.encode(body.prompt)
        return S.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=served.context)

    @router.post("/detokenize", response_model=S.DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: S.DetokenizeRequest) -> S.DetokenizeResponse:
        served = server.model(body.model)
        check_ids(served, body.tokens, "tokens")
        return S.DetokenizeResponse(prompt=served.tokenizer.decode(body.tokens))

    @router.get("/tokenizer_info", response_model=S.TokenizerInfo, responses=ERROR_RESPONSES)
    async def tokenizer_info(model: str | None = None) -> S.TokenizerInfo:
        served = server.model(model)
        tok = served.tokenizer
        eos = EOT if tok.special_id(EOT) is not None else None
        return S.TokenizerInfo(model=served.name, tokenizer_kind=tok.kind, vocab_size=tok.vocab_size,
                               eos_token=eos, bos_token=eos, pad_token=None, model_max_length=served.context,
                               chat_template=tok.chat_template.jinja(), chat_template_kind=tok.chat_template.kind,
                               chat_template_source=served.chat_template,
                               has_chat_template=served.chat_template in ("checkpoint", "chatml", "plain"))

    router.include_router(v1)
    return router


def _openapi(app: FastAPI, secured: bool, public_metrics: bool = False) -> dict:
    """FastAPI's document, corrected to what is served: validation errors are 400 (OpenAI's
    shape, listed per route), never 422; and the bearer key where one is required."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in schema["paths"].items():
        for op in operations.values():
            op.get("responses", {}).pop("422", None)
            if secured and not is_open(path, public_metrics):
                op["security"] = [{"bearer": []}]
    components = schema.setdefault("components", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = schema
    return schema
