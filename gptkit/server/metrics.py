"""Prometheus metrics of one app, in its own CollectorRegistry (two apps in one process, as in
the tests, never share or clash), and the ASGI middleware that counts requests by status."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptkit.inference.engine import Engine

# Paths with a parameter are labelled by their template, anything unknown as "other": a
# client must not be able to create label values at will.
_PATH_LABELS = {"/v1/models/": "/v1/models/{model}"}
KNOWN_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/moderations", "/health", "/metrics",
               "/tokenize", "/detokenize", "/tokenizer_info", "/openapi.json", "/docs"}

# the engines' prefix caches (gptkit/inference/prefix_cache.py PrefixStats), per model
_PREFIX_CACHE = {"lookups": "prompts looked up in the prefix cache",
                 "hits": "prompts that reused at least one cached block",
                 "prompt_tokens": "tokens of the prompts looked up",
                 "hit_tokens": "prompt tokens whose keys and values came from the cache (not prefilled)",
                 "evictions": "blocks dropped to keep the cache within its capacity",
                 "bytes": "bytes of keys and values held", "blocks": "blocks held"}

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gptkit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("gptkit_request_latency_seconds", "time from request to the last byte sent",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gptkit_time_to_first_token_seconds", "time from request to the first generated token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gptkit_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.generated_tokens = Counter("gptkit_generated_tokens", "tokens generated", ["model"], registry=r)
        self.cancelled = Counter("gptkit_cancelled_requests", "generations cancelled because the client went away",
                                 ["model"], registry=r)
        self.running = Gauge("gptkit_running_requests", "requests in the engine's batch", ["model"], registry=r)
        self.queued = Gauge("gptkit_queued_requests", "requests waiting for a batch slot", ["model"], registry=r)
        self.prefix = {f: Gauge(f"gptkit_prefix_cache_{f}", text, ["model"], registry=r) for f, text in _PREFIX_CACHE.items()}
        self.prefix["capacity_bytes"] = Gauge("gptkit_prefix_cache_capacity_bytes", "the prefix cache's size limit",
                                              ["model"], registry=r)
        # per API key, labelled by the key's name from the keys file (never by the key)
        self.key_requests = Counter("gptkit_key_requests", "HTTP requests by API key name and status",
                                    ["key", "status"], registry=r)
        self.key_tokens = Counter("gptkit_key_tokens", "tokens used by API key name, prompt or completion",
                                  ["key", "kind"], registry=r)
        self.key_rate_limited = Counter("gptkit_key_rate_limited", "429s by API key name and the limit hit",
                                        ["key", "limit"], registry=r)

    def record_key(self, record) -> None:
        """A finished request's usage under its key's name (a sink of RequestContext)."""
        if record.key_name is None:
            return
        self.key_requests.labels(record.key_name, str(record.status)).inc()
        self.key_tokens.labels(record.key_name, "prompt").inc(record.prompt_tokens)
        self.key_tokens.labels(record.key_name, "completion").inc(record.completion_tokens)

    def render(self, engines: dict[str, Engine]) -> bytes:
        """The text exposition, with the engines' load and prefix caches read now."""
        for name, engine in engines.items():
            self.running.labels(name).set(engine.running)
            self.queued.labels(name).set(engine.queued)
            if (cache := engine.prefix_cache) is not None:
                for field, gauge in self.prefix.items():
                    gauge.labels(name).set(cache.capacity_bytes if field == "capacity_bytes" else getattr(cache.stats, field))
        return generate_latest(self.registry)


def endpoint_label(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    return next((label for prefix, label in _PATH_LABELS.items() if path.startswith(prefix)), "other")


class RequestMetrics:
    """ASGI middleware: counts every response by status and times it to its last byte (for a
    stream, the end of the stream; a client that leaves early is counted when it leaves)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        label = endpoint_label(scope["path"])

        async def send_and_record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
