"""The OpenAI-compatible app: `create_app([ServedModel(name, engine, tokenizer), ...], ServerConfig())`.

Each model has one Engine whose scheduler thread runs the batch; handlers only submit token
ids and consume events with `handle.aiter()`, so the event loop never blocks on the model.
Text enters through the tokenizer (`encode`, `render_chat`) and leaves through `TextStream`,
which never splits a UTF-8 character nor shows the start of a stop string.

Here: create_app, its routes and the OpenAPI document. What is served: config.py (ServedModel,
ServerConfig); the state the handlers share: state.py (Server); a request's stream of events:
generation.py; the OpenAI handlers and their responses: completions.py.

    /v1/models, /v1/models/{id}, /v1/completions, /v1/chat/completions   OpenAI's API
    /tokenize, /detokenize, /tokenizer_info                              for evaluation harnesses
    /v1/moderations                                                      with --moderation (moderation.py)
    /v1/attention                                     gptkit's extension: attention weights (attention.py)
    /health                                                              open even with API keys (auth.py)
    /, /chat, /static/...                                 the chat page, open even with a key (webui.py)
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, Awaitable

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from gptkit.server import schemas as S
from gptkit.server.attention import attention_routes
from gptkit.server.auth import KeyAuth, is_open, model_allowed
from gptkit.server.completions import chat_completions, check_ids, completions
from gptkit.server.config import ServedModel, ServerConfig
from gptkit.server.context import RequestContext
from gptkit.server.errors import install_handlers
from gptkit.server.limits import BodyLimit
from gptkit.server.metrics import RequestMetrics
from gptkit.server.moderation import moderation_routes
from gptkit.server.state import Server
from gptkit.server.webui import mount_page
from gptkit.text.tokenizer import EOT

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
ERROR_RESPONSES = {s: {"model": S.ErrorResponse} for s in (400, 401, 404, 413, 429)}
# with stream=true each server-sent event (as a client parses it) is one object whose data is a JSON chunk or [DONE]
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}
SSE_RESPONSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                      "description": "JSON, or with stream=true server-sent events of chunks ending in [DONE]"}}


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
    app.include_router(moderation_routes(server.moderator, ERROR_RESPONSES, cfg.limits))
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
        engines = {name: m.engine for name, m in server.models.items()}
        return Response(server.metrics.render(engines), media_type=CONTENT_TYPE_LATEST)

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
