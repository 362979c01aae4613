"""What `create_app` serves, and how: one ServedModel per model (its engine and tokenizer) and
the ServerConfig (API keys, limits, audit log, moderation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gptkit.inference.engine import Engine
from gptkit.server import schemas as S
from gptkit.server.audit import AuditLog
from gptkit.server.auth import ApiKey
from gptkit.server.limits import Limits
from gptkit.server.moderation import Moderator
from gptkit.server.ratelimit import WINDOW_S
from gptkit.text.tokenizer import Tokenizer
from gptkit.text.chat import use_chat_template


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
