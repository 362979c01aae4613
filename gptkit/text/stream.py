"""Streaming text: generated token ids -> text deltas that never split a UTF-8 character.

    StreamDecoder(tokenizer).push(token_id) -> str      # token by token, no stop strings
    TextStream(tokenizer, stop).push(event) -> str      # one per sample of an engine request
    completion_text(tokenizer, completion) -> str       # a finished sample's text
    find_stop(buf, stops, start), stop_holdback(buf, stops)   # stop strings, matched on bytes

The engine (gptkit/inference/engine.py) knows nothing about text and matches stop strings on
bytes with find_stop; CLI and server turn its events into text here. text/ is the lowest stage
and does not import inference: TextStream and completion_text take any object with the fields
they read (EventLike, CompletionLike), which gptkit.inference.requests' Event and Completion have.
"""

from __future__ import annotations

import codecs
from typing import Callable, Protocol, Sequence

from gptkit.text.tokenizer import Tokenizer


class EventLike(Protocol):
    """What TextStream reads of an engine event (gptkit.inference.requests.Event)."""

    token_id: int | None
    finish_reason: str | None
    stop_text_offset: int | None


class CompletionLike(Protocol):
    """What completion_text reads of a finished sample (gptkit.inference.requests.Completion)."""

    token_ids: list[int]
    stop_text_offset: int | None


class StreamDecoder:
    """Turns token ids, one at a time, into text deltas that never split a UTF-8 character.

    A byte-level token can end in the middle of a multi-byte character (Chinese, emoji); the
    incremental UTF-8 decoder holds those bytes back until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ------------------------------------------------------------------------------------ stop strings
def find_stop(buf: bytes, stops: Sequence[bytes], start: int = 0) -> int | None:
    """Byte offset of the earliest stop string in buf that ends at or after `start`."""
    hits = [p for s in stops if (p := buf.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def stop_holdback(buf: bytes, stops: Sequence[bytes]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of a stop string:
    those bytes may still become a stop string, so they must not be shown yet."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Events of one sample -> text deltas that never split a UTF-8 character and never show
    bytes that may belong to a stop string. Used by generate, chat and the server alike.

    push takes an engine Event (gptkit.inference.requests); it is typed as EventLike, the fields
    it reads, because text/ sits below inference and does not import it."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.token_bytes: Callable[[int], bytes] = tokenizer.token_bytes
        self.stops = [s.encode("utf-8") for s in stop if s]
        self._buf = bytearray()
        self._sent = 0  # bytes handed to the UTF-8 decoder
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, event: EventLike) -> str:
        if event.token_id is not None:
            self._buf += self.token_bytes(event.token_id)
        if event.finish_reason is None:
            return self._release(len(self._buf) - stop_holdback(self._buf, self.stops), final=False)
        end = event.stop_text_offset if event.stop_text_offset is not None else len(self._buf)
        return self._release(end, final=True)

    def _release(self, end: int, final: bool) -> str:
        chunk = bytes(self._buf[self._sent:max(end, self._sent)])
        self._sent = max(end, self._sent)
        return self._utf8.decode(chunk, final=final)


def completion_text(tokenizer, completion: CompletionLike) -> str:
    """The decoded text of a completion, cut before a matched stop string."""
    data = b"".join(tokenizer.token_bytes(t) for t in completion.token_ids)
    if completion.stop_text_offset is not None:
        data = data[:completion.stop_text_offset]
    return data.decode("utf-8", errors="replace")
