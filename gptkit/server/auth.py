"""API keys: who may call the server, on which models, within which limits.

A keys file is JSON Lines, one key per line; the key itself is never stored, only its SHA-256:

    {"name": "alice", "sha256": "9f86d0...", "models": ["tiny"], "requests_per_minute": 60,
     "tokens_per_minute": 20000, "concurrent_requests": 4}

`models` (default: every model) and the three limits (default: none) are optional; `"admin": true`
lets a key read /metrics, which names every key and its traffic (`--api-key`'s key is admin).
`gptkit keys add NAME --file keys.jsonl ...` makes a key, appends its line and prints the key
once. `--api-key KEY` is the one-key shortcut (name "default", no limits).

With any key configured, every path needs `Authorization: Bearer KEY` except OPEN_PATHS:
/health (load balancers), and the files of the chat page (webui.PAGE_PATHS: the page holds no
secrets and asks its user for a key). /metrics needs an admin key, or is open to all with
`--public-metrics`. A model a key may not use answers exactly as a missing one (404), and
requests answered 404 do not count against the key's requests per minute.
/docs and /redoc are switched off when keys are set (they load Swagger/ReDoc from a CDN);
/openapi.json stays, behind the key. The key never appears in logs, errors or metrics: only
its name does.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_text
from gptkit.server.context import current_request
from gptkit.server.errors import error_response
from gptkit.server.ratelimit import KeyLimiter, KeyLimits, RateLimited, WINDOW_S, retry_headers
from gptkit.server.webui import PAGE_PATHS

OPEN_PATHS = frozenset({"/health", "/favicon.ico", *PAGE_PATHS})
METRICS_PATH = "/metrics"
KEY_PREFIX = "gk-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def is_open(path: str, public_metrics: bool = False) -> bool:
    return path in OPEN_PATHS or (public_metrics and path == METRICS_PATH)


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    models: frozenset[str] | None = None  # None: every model
    limits: KeyLimits = KeyLimits()
    admin: bool = False  # may read /metrics

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "sha256": self.sha256, **({"admin": True} if self.admin else {})}
        if self.models is not None:
            out["models"] = sorted(self.models)
        for k in ("requests_per_minute", "tokens_per_minute", "concurrent_requests"):
            if (v := getattr(self.limits, k)) is not None:
                out[k] = v
        return out


_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")


def parse_key(data: dict, where: str) -> ApiKey:
    if not isinstance(data, dict):
        raise GptkitError(f"{where}: expected a JSON object")
    unknown = set(data) - {"name", "sha256", "models", "admin", *_LIMIT_FIELDS}
    if unknown:
        raise GptkitError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name, digest = data.get("name"), data.get("sha256")
    if not isinstance(name, str) or not name:
        raise GptkitError(f"{where}: `name` must be a non-empty string")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise GptkitError(f"{where}: `sha256` must be 64 lowercase hex digits (the SHA-256 of the key)")
    models = data.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise GptkitError(f"{where}: `models` must be a list of model names")
    if not isinstance(data.get("admin", False), bool):
        raise GptkitError(f"{where}: `admin` must be true or false")
    limits = {}
    for k in _LIMIT_FIELDS:
        v = data.get(k)
        if v is not None and (type(v) is not int or v < 1):
            raise GptkitError(f"{where}: `{k}` must be a positive integer, got {v!r}")
        limits[k] = v
    return ApiKey(name, digest, frozenset(models) if models is not None else None, KeyLimits(**limits),
                  data.get("admin", False))


def load_keys(path: str | Path) -> list[ApiKey]:
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path}: keys file not found")
    keys = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptkitError(f"{path}:{n}: not JSON ({e.msg})") from None
        keys.append(parse_key(data, f"{path}:{n}"))
    if not keys:
        raise GptkitError(f"{path}: no keys")
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise GptkitError(f"{path}: key names must be unique")
    if len({k.sha256 for k in keys}) != len(keys):
        raise GptkitError(f"{path}: the same key is listed twice")
    return keys


def add_key(path: str | Path, name: str, models: list[str] | None, limits: KeyLimits, admin: bool = False) -> str:
    """Append a new key to the keys file (created if missing); returns the key, which is
    stored nowhere else."""
    path = Path(path)
    existing = load_keys(path) if path.is_file() and path.read_text(encoding="utf-8").strip() else []
    if any(k.name == name for k in existing):
        raise GptkitError(f"{path}: a key named {name!r} exists already")
    key = new_key()
    entry = ApiKey(name, hash_key(key), frozenset(models) if models else None, limits, admin)
    parse_key(entry.to_json(), name)  # the same checks as when it is loaded
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry.to_json()) + "\n")
    return key


def revoke_key(path: str | Path, name: str) -> None:
    """Remove the key called name from the keys file (rewritten atomically); a running server
    reads the file at start, so restart it for the key to stop working."""
    path = Path(path)
    keys = load_keys(path) if path.is_file() else []
    if not any(k.name == name for k in keys):
        raise GptkitError(f"{path}: no key named {name!r} (keys: {', '.join(k.name for k in keys) or 'none'})")
    atomic_write_text(path, "".join(json.dumps(k.to_json()) + "\n" for k in keys if k.name != name))


class KeyRing:
    """The configured keys and each one's limiter."""

    def __init__(self, keys: list[ApiKey], period: float = WINDOW_S):
        self.keys = keys
        self.limiters = {k.name: KeyLimiter(k.limits, period) for k in keys if k.limits.any}

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash matches, compared in constant time against every key (no early
        exit, so timing says nothing about which or how many keys exist)."""
        digest = hash_key(presented).encode()
        found = None
        for k in self.keys:
            if secrets.compare_digest(digest, k.sha256.encode()):
                found = k
        return found


def model_allowed(model: str) -> bool:
    allowed = current_request().key_models
    return allowed is None or model in allowed


class KeyAuth:
    """ASGI middleware: the bearer key of every non-open path, then its rate limits. It runs
    before the body is read, so a client without a key or over its limit learns that first."""

    def __init__(self, app, ring: KeyRing | None, public_metrics: bool = False, on_limited=None):
        self.app, self.ring, self.public_metrics = app, ring, public_metrics
        self.on_limited = on_limited  # called with (key name, limit) on each 429

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.ring is None or is_open(scope["path"], self.public_metrics):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, presented = header.partition(" ")
        key = self.ring.find(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
        if key is None:
            message = ("incorrect API key" if presented.strip() else
                       "missing API key: send the header `Authorization: Bearer <key>`")
            return await error_response(401, message, code="invalid_api_key")(scope, receive, send)
        if scope["path"] == METRICS_PATH and not key.admin:
            return await error_response(403, f"API key {key.name!r} may not read {METRICS_PATH} (it names every key and "
                                        "its traffic): use an admin key (`gptkit keys add NAME --admin`), or start the "
                                        "server with --public-metrics", code="permission_denied")(scope, receive, send)
        record = current_request()
        record.key_name, record.key_models = key.name, key.models
        limiter = self.ring.limiters.get(key.name)
        if limiter is None:
            return await self.app(scope, receive, send)
        try:
            admitted = limiter.admit()
        except RateLimited as e:
            if self.on_limited:
                self.on_limited(key.name, e.limit)
            headers = {**limiter.headers(), **retry_headers(e.wait)}
            return await error_response(429, f"rate limit of API key {key.name!r}: {e.message}; retry in "
                                        f"{e.wait:.1f}s", code="rate_limit_exceeded",
                                        headers=headers)(scope, receive, send)
        record.meter = limiter

        status = []

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(k.encode(), v.encode()) for k, v in limiter.headers().items()]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            limiter.release()
            if status == [404]:  # nothing was found to serve: not a request the key used up
                limiter.refund(admitted)
