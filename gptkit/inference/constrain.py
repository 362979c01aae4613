"""Grammar-constrained decoding: JSON that always parses, through llguidance.

A request's JSON schema is compiled once (cached per schema) into an llguidance grammar; each
constrained row then holds a matcher that says, before every step, which token ids may come next
(a bitmask over the vocabulary), and consumes the token sampled. The engine applies the masks of
all constrained rows of a step in one tensor op before the batched sampler, so constrained and
free rows share a batch, and temperature, top-k/p, seeds, n > 1 and logprobs work unchanged (the
logprobs are those of the constrained distribution). The end-of-text tokens are allowed only
where the grammar is complete, so a reply ends either valid or cut by max_tokens ("length").

llguidance was chosen by measurement (benchmarks/structured.py): see BENCHMARKS.md.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Callable

import torch

from gptkit.errors import GptkitError
from gptkit.text.tools import CALL_CLOSE, CALL_OPEN, call_schema

JSON_OBJECT = {"type": "object"}  # response_format {"type": "json_object"}: any JSON object
MAX_SCHEMA_BYTES = 64 * 1024  # a schema this large is a mistake, or an attempt to tie up the compiler
# compact JSON as OpenAI's models write it (", " and ": "): free whitespace lets an untrained model
# pad with newlines until max_tokens cuts it
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@lru_cache(maxsize=256)
def _grammar(schema_json: str) -> str:
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(schema_json, overrides=COMPACT)
    except ValueError as e:
        raise GptkitError(f"json_schema: {str(e).splitlines()[0]}") from None


def tool_call_grammar(tools: list[dict], parallel: bool = True) -> str:
    """The grammar of a reply that is only tool calls (tool_choice "required" or a named function),
    in gptkit's format (gptkit.text.tools), each call's arguments valid under its parameters."""
    from llguidance import LLMatcher

    schema = {**call_schema(tools), "x-guidance": COMPACT}
    more = ' ("\\n" call)*' if parallel else ""
    lark = (f"start: call{more}\ncall: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}\n"
            f"body: %json {json.dumps(schema, ensure_ascii=False)}\n")
    return LLMatcher.grammar_from_lark(lark)


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of a JSON schema, compiled once per distinct schema (at most
    MAX_SCHEMA_BYTES of JSON; llguidance bounds the grammar's size and the work per token itself)."""
    if not isinstance(schema, dict):
        raise GptkitError(f"json_schema: the schema must be a JSON object, not {type(schema).__name__}")
    text = json.dumps(schema, sort_keys=True, ensure_ascii=False)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise GptkitError(f"json_schema: the schema is {len(text.encode()):,} bytes of JSON; at most "
                          f"{MAX_SCHEMA_BYTES:,}")
    return _grammar(text)


class GrammarVocab:
    """llguidance's view of a gptkit tokenizer (every id's bytes, the end-of-text ids), built on
    first use and kept: it walks the whole vocabulary once (~0.1-1 s)."""

    def __init__(self, token_bytes: Callable[[int], bytes], encode: Callable[[str], list[int]], vocab_size: int,
                 eos_ids: list[int], special_ids: list[int]):
        """special_ids: the control tokens (<|im_start|>, ...): never part of the JSON text, although their
        spelling is valid string content."""
        self._args = token_bytes, encode, vocab_size, sorted(eos_ids), sorted(set(special_ids) | set(eos_ids))
        self._built = None
        self._lock = threading.Lock()
        self.vocab_size = vocab_size

    def get(self):
        with self._lock:
            if self._built is None:
                self._built = self._build(*self._args)
            return self._built

    @staticmethod
    def _build(token_bytes, encode, vocab_size: int, eos_ids: list[int], special_ids: list[int]):
        from llguidance import LLTokenizer, TokenizerWrapper

        if not eos_ids:
            raise GptkitError("structured output needs an end-of-text token in the tokenizer")

        class Source:  # what TokenizerWrapper reads
            eos_token_id = eos_ids[0]
            bos_token_id = None
            tokens = [token_bytes(i) for i in range(vocab_size)]
            special_token_ids = [i for i in special_ids if i < vocab_size]

            def __call__(self, s):
                return encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)

        return LLTokenizer(TokenizerWrapper(Source()), n_vocab=vocab_size, eos_token=eos_ids)

    def check(self, grammar: str) -> None:
        """GptkitError (one line) when llguidance cannot build a matcher for this grammar."""
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.get())
        if error:
            raise GptkitError(f"json_schema: {error.strip().splitlines()[0]}")


class Constraint:
    """One row's matcher: the ids allowed next, and the ids sampled."""

    def __init__(self, vocab: GrammarVocab, grammar: str):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(vocab.get(), grammar, log_level=0)
        if self.matcher.is_error():
            raise GptkitError(f"json_schema: {self.matcher.get_error()}")

    def fill(self, bitmask: torch.Tensor) -> None:
        """Write the allowed ids into this row's bitmask (contiguous int32 on the CPU, one bit per id).
        (llguidance.torch does the same, but importing it compiles a kernel with torch.compile.)"""
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)


def apply_masks(logits: torch.Tensor, constraints: list[Constraint | None]) -> torch.Tensor:
    """logits (B, V) with the ids a row's grammar forbids set to -inf; rows without a constraint
    unchanged. One bitmask for the step, filled row by row, unpacked in one tensor op."""
    B, V = logits.shape
    words = (V + 31) // 32
    bitmask = torch.full((B, words), -1, dtype=torch.int32)
    for i, c in enumerate(constraints):
        if c is not None:
            c.fill(bitmask[i:i + 1])
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # (B, words, 32)
    allowed = bits.view(B, words * 32)[:, :V].bool().to(logits.device)
    return logits.masked_fill(~allowed, float("-inf"))
