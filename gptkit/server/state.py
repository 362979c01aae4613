"""The app state the handlers share (`Server`): the served models, the server's settings,
metrics, API keys and moderator; it turns a request's prompts into a Generation.
"""

from __future__ import annotations

import time

from gptkit.config import SampleConfig
from gptkit.inference.requests import RequestHandle
from gptkit.server.auth import ApiKey, KeyRing, hash_key, model_allowed
from gptkit.server.config import ServedModel, ServerConfig
from gptkit.server.context import current_request
from gptkit.server.errors import APIError
from gptkit.server.generation import Generation
from gptkit.server.limits import check_queue
from gptkit.server.metrics import Metrics
from gptkit.server.ratelimit import RateLimited, retry_headers


class Server:
    """The models, limits and metrics the handlers share."""

    def __init__(self, models: list[ServedModel], config: ServerConfig):
        if not models:
            raise ValueError("serve at least one model")
        self.models = {m.name: m for m in models}
        self.config = config
        self.metrics = Metrics()
        self.keys = KeyRing(config.api_keys + ([ApiKey("default", hash_key(config.api_key), admin=True)] if config.api_key else []),
                            config.limit_window_s)
        self.moderator = config.moderator

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            name = next((m for m in self.models if model_allowed(m)), next(iter(self.models)))
        if name not in self.models or not model_allowed(name):  # forbidden answers as missing: nothing leaks
            raise APIError(404, f"model {name!r} not found; this server has: "
                           f"{', '.join(m for m in self.models if model_allowed(m))}",
                           param="model", code="model_not_found")
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
        check_key_tokens(sum(len(p) for p in prompts) + len(prompts) * n * params.max_tokens)
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


def check_key_tokens(tokens: int) -> None:
    """429 before any work when a request may use more of its key's tokens per minute than are left
    (the key check at the door only sees that something is left)."""
    record = current_request()
    if record.meter is None:
        return
    try:
        record.meter.check_cost(tokens)
    except RateLimited as e:
        raise APIError(429, f"rate limit of API key {record.key_name!r}: {e.message}; retry in {e.wait:.1f}s",
                       code="rate_limit_exceeded", headers=retry_headers(e.wait)) from None
