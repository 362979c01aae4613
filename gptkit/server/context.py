"""What one HTTP request did, for whoever accounts for it: `RequestRecord`, set by the
`RequestContext` middleware and found by handlers with `current_request()`.

The key check (auth.py) fills in the key's name and its rate-limit state, handlers the model,
tokens and moderation verdict; when the response is done, the sinks (the audit log, per-key
metrics) get the finished record. A ContextVar rather than an argument: the record reaches the
engine-facing code (Server.generate, Generation) without threading a Request through it, and
tasks the handler starts inherit it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class TokenMeter(Protocol):
    def check_cost(self, tokens: int) -> None: ...  # raises RateLimited when a request may not fit

    def charge(self, tokens: int) -> None: ...


@dataclass
class RequestRecord:
    route: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    time: float = field(default_factory=time.time)
    status: int = 500
    key_name: str | None = None
    key_models: frozenset[str] | None = None  # None: every model
    meter: TokenMeter | None = None  # the key's token window, charged as tokens are used
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    moderation: str | None = None  # None: not moderated; "ok"; "flagged:input:<categories>"...
    want_text: bool = False  # the audit log keeps prompt and completion text
    prompt_text: list[str] | None = None
    completion_text: list[str] | None = None

    def add_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if self.meter is not None:
            self.meter.charge(prompt + completion)

    def latency(self) -> float:
        return time.perf_counter() - self.started


_CURRENT: ContextVar[RequestRecord | None] = ContextVar("gptkit_request", default=None)


def current_request() -> RequestRecord:
    """The record of the request being handled (a detached one outside a request, e.g. in tests
    that call handlers directly), so callers never need to check for None."""
    return _CURRENT.get() or RequestRecord(route="", method="")


class RequestContext:
    """ASGI middleware: one RequestRecord per HTTP request, its status and latency, then each
    sink called with it once the response (for a stream, its last byte) is sent."""

    def __init__(self, app, sinks: list[Callable[[RequestRecord], Any]], want_text: bool = False):
        self.app, self.sinks, self.want_text = app, sinks, want_text

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = RequestRecord(route=scope["path"], method=scope["method"], want_text=self.want_text)
        token = _CURRENT.set(record)

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            _CURRENT.reset(token)
            for sink in self.sinks:
                sink(record)
