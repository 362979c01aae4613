"""Per-key rate limits as OpenAI applies them: requests and tokens per minute in a sliding
window, and requests in flight. Over a limit a request gets 429 with `Retry-After` (and the
more precise `retry-after-ms`, which the openai client prefers); every response of a limited
key carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.

Tokens are charged as they are used (prompt tokens when a generation is submitted, completion
tokens as they are generated), so a request is admitted while the key's window has at least
one token left, and what it then uses counts against the next ones.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0  # "per minute"


@dataclass(frozen=True)
class KeyLimits:
    """None: no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute,
                                           self.concurrent_requests))


class Window:
    """Amounts used in the last `period` seconds (a log of (time, amount), pruned as it ages)."""

    def __init__(self, limit: int, period: float):
        self.limit, self.period = limit, period
        self._log: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        while self._log and self._log[0][0] <= now - self.period:
            self._used -= self._log.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self._used

    def remaining(self, now: float) -> int:
        return max(self.limit - self.used(now), 0)

    def add(self, now: float, amount: int) -> None:
        if amount > 0:
            self._log.append((now, amount))
            self._used += amount

    def remove(self, t: float, amount: int) -> None:
        """Take back an amount added at time t (a request that did not count after all)."""
        if (t, amount) in self._log:
            self._log.remove((t, amount))
            self._used -= amount

    def wait(self, now: float, need: int = 1) -> float:
        """Seconds until `need` units are free again (0 when they are free now)."""
        used = self.used(now)
        if used + need <= self.limit:
            return 0.0
        for t, amount in self._log:  # oldest first: when enough of them have aged out
            used -= amount
            if used + need <= self.limit:
                return max(t + self.period - now, 0.0)
        return self.period  # more than the limit

    def reset(self, now: float) -> float:
        """Seconds until the window is empty again, as OpenAI's x-ratelimit-reset-* report."""
        self._expire(now)
        return max(self._log[-1][0] + self.period - now, 0.0) if self._log else 0.0


class RateLimited(Exception):
    def __init__(self, limit: str, message: str, wait: float):
        super().__init__(message)
        self.limit, self.message, self.wait = limit, message, wait


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def retry_headers(wait: float) -> dict[str, str]:
    wait = max(wait, 0.001)
    return {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))}


class KeyLimiter:
    """One key's windows and in-flight count. Called from the event loop (admit, headers,
    release) and from handlers (charge); a lock keeps the windows consistent either way."""

    def __init__(self, limits: KeyLimits, period: float = WINDOW_S, clock=time.monotonic):
        self.limits, self.clock = limits, clock
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        self.requests = Window(rpm, period) if rpm is not None else None
        self.tokens = Window(tpm, period) if tpm is not None else None
        self.in_flight = 0
        self._lock = threading.Lock()

    def admit(self) -> float:
        """Count one request in (returns when, for refund), or raise RateLimited naming the limit and the wait."""
        with self._lock:
            now = self.clock()
            cap = self.limits.concurrent_requests
            if cap is not None and self.in_flight >= cap:
                raise RateLimited("concurrent", f"{self.in_flight} requests in flight, the key's limit is {cap}", 1.0)
            if self.requests is not None and self.requests.remaining(now) == 0:
                raise RateLimited("requests", f"limit of {self.requests.limit} requests per minute reached",
                                  self.requests.wait(now))
            if self.tokens is not None and self.tokens.remaining(now) == 0:
                raise RateLimited("tokens", f"limit of {self.tokens.limit} tokens per minute reached",
                                  self.tokens.wait(now))
            if self.requests is not None:
                self.requests.add(now, 1)
            self.in_flight += 1
            return now

    def refund(self, admitted: float) -> None:
        """The request admitted at that time does not count against requests per minute (a 404)."""
        with self._lock:
            if self.requests is not None:
                self.requests.remove(admitted, 1)

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def check_cost(self, tokens: int) -> None:
        """Before generating: a request that may use `tokens` (its prompts + n x max_tokens) must fit
        in what the key has left this minute, not only find something left."""
        if self.tokens is None:
            return
        with self._lock:
            now, limit = self.clock(), self.tokens.limit
            if tokens > limit:
                raise RateLimited("tokens", f"this request may use {tokens} tokens (prompts + n x max_tokens), more "
                                  f"than the key's {limit} tokens per minute; lower max_tokens or n", self.tokens.period)
            if tokens > self.tokens.remaining(now):
                raise RateLimited("tokens", f"this request may use {tokens} tokens and {self.tokens.remaining(now)} "
                                  f"of the key's {limit} tokens per minute are left", self.tokens.wait(now, tokens))

    def charge(self, tokens: int) -> None:
        if self.tokens is not None:
            with self._lock:
                self.tokens.add(self.clock(), tokens)

    def headers(self) -> dict[str, str]:
        out = {}
        with self._lock:
            now = self.clock()
            for kind, window in (("requests", self.requests), ("tokens", self.tokens)):
                if window is not None:
                    out[f"x-ratelimit-limit-{kind}"] = str(window.limit)
                    out[f"x-ratelimit-remaining-{kind}"] = str(window.remaining(now))
                    out[f"x-ratelimit-reset-{kind}"] = duration(window.reset(now))
        return out
