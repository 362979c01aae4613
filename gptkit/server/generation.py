"""One request's generation: the engine handles of its prompts as one stream of choices
(Generation), what each choice has produced (Choice), the sampling parameters of an OpenAI
request (sample_config), and a stream's server-sent events (EventStream).

Text leaves through `TextStream`, which never splits a UTF-8 character nor shows the start
of a stop string.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gptkit.config import SampleConfig
from gptkit.errors import GptkitError
from gptkit.inference.constrain import JSON_OBJECT, json_schema_grammar
from gptkit.inference.requests import Event, RequestHandle
from gptkit.server import schemas as S
from gptkit.server.config import ServedModel
from gptkit.server.context import current_request
from gptkit.server.errors import APIError, error_body, log
from gptkit.server.metrics import Metrics
from gptkit.server.moderation import Moderator
from gptkit.text.stream import TextStream


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


async def sample_config(served: ServedModel, body: S.SamplingRequest, max_tokens: int,
                        logprobs: int | None) -> SampleConfig:
    grammar = None
    if body.response_format is not None:  # compiling takes a while: off the event loop, and only when asked
        grammar = await asyncio.to_thread(response_grammar, served, body.response_format)
    return SampleConfig(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                        stop=list(body.stop), seed=body.seed, logprobs=logprobs, grammar=grammar)


def response_grammar(served: ServedModel, fmt: S.ResponseFormat | None) -> str | None:
    """The grammar a response_format asks for (None: free text); a 400 naming the field when the
    schema cannot be enforced."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        schema, param = JSON_OBJECT, "response_format"
    else:
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format.json_schema")
        schema, param = fmt.json_schema.schema_, "response_format.json_schema.schema"
    try:
        grammar = json_schema_grammar(schema)
        served.engine.grammar_vocab.check(grammar)
    except GptkitError as e:
        raise APIError(400, str(e), param=param) from None
    return grammar
