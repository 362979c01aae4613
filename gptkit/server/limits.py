"""What one request may cost: each limit is a `gptkit serve` option with the default below.

The body size limit (--max-body, BodyLimit below) bounds everything a request can carry;
these bound the work it can ask for. A request over a limit gets a 400 naming the field
(`param`) and the option that raises the limit; a full queue is a 429 (retry later). The queue
and the batch count sequences (prompts x n), not requests, so a long prompt list cannot take
every slot with one request.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import os
from dataclasses import dataclass, fields

from gptkit.errors import GptkitError
from gptkit.server.errors import APIError, error_response


@dataclass
class Limits:
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # characters per stop string (matching cost grows with length)
    max_prompts: int = 64  # prompts in one /v1/completions request (a list of texts or of id lists)
    max_request_tokens: int = 32768  # prompts x n x max_tokens: tokens one request may ask to generate
    max_moderation_chars: int = 65536  # characters of all the texts of one /v1/moderations request
    max_attention_tokens: int = 256  # tokens /v1/attention runs: its answer grows with heads x tokens^2

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise GptkitError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)} must be at least 1")

    def check_stop(self, stop: list[str]) -> None:
        if len(stop) > self.max_stop:
            raise APIError(400, f"at most {self.max_stop} stop sequences (--max-stop), got {len(stop)}",
                           param="stop")
        longest = max(stop, key=len, default="")
        if len(longest) > self.max_stop_chars:
            raise APIError(400, f"stop sequence of {len(longest)} characters is over the limit of "
                           f"{self.max_stop_chars} (--max-stop-chars)", param="stop")

    def check_prompts(self, count: int) -> None:
        if count > self.max_prompts:
            raise APIError(400, f"{count} prompts in one request is over the limit of {self.max_prompts} "
                           "(--max-prompts); send them in several requests", param="prompt")

    def check_tokens(self, prompts: int, n: int, max_tokens: int, param: str = "max_tokens") -> None:
        total = prompts * n * max_tokens
        if total > self.max_request_tokens:
            raise APIError(400, f"{prompts} prompt(s) x n={n} x max_tokens {max_tokens} = {total} tokens is over "
                           f"the limit of {self.max_request_tokens} per request (--max-request-tokens)",
                           param=param)

    def check_moderation(self, texts: list[str]) -> None:
        total = sum(map(len, texts))
        if total > self.max_moderation_chars:
            raise APIError(400, f"input of {total} characters is over the limit of {self.max_moderation_chars} per "
                           "request (--max-moderation-chars); send it in parts", param="input")

    def default_max_tokens(self, room: int, n: int) -> int:
        """max_tokens when a chat request gives none: the rest of the context, within the limit."""
        return max(min(room, self.max_request_tokens // n), 1)


def check_queue(name: str, queued: int, sequences: int, max_queue: int) -> None:
    """A request of `sequences` (prompts x n) joining a queue that holds `queued` of them."""
    if sequences > max_queue:
        raise APIError(400, f"the request has {sequences} sequences (prompts x n), more than the queue holds "
                       f"(--max-queue {max_queue}); send fewer prompts or a smaller n", param="prompt")
    if queued + sequences > max_queue:
        raise APIError(429, f"model {name!r} has {queued} sequences waiting (--max-queue {max_queue}); "
                       "retry shortly", code="queue_full", headers={"Retry-After": "1", "retry-after-ms": "1000"})


TRIM_AFTER = 1 << 20  # bytes of request body after which the freed memory is handed back to the system


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the system (glibc's malloc_trim; a no-op
    elsewhere): without it a few large requests keep the server's memory at their peak for good."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library may run ldconfig); None where there is none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


class BodyLimit:
    """ASGI middleware: 413 for a body over max_body bytes, by its Content-Length when sent,
    else while it is being read; after a large body, freed memory goes back to the system."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"request body of {size} bytes is over the limit of {self.max_body} bytes",
                        code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            e = self._too_large(length.decode())
            return await error_response(413, e.detail, code=e.code)(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise self._too_large(f"more than {self.max_body}")
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            if received > TRIM_AFTER and not os.environ.get("GPTKIT_NO_TRIM"):  # (set: benchmarks compare)
                await asyncio.to_thread(release_memory)
