"""Preference pairs (DPO): validated records -> pairs of examples that share their prompt.

Each answer is encoded exactly as supervised fine-tuning encodes it, so a model tuned with
either method is prompted the same way afterwards: a plain pair as prompt + answer +
<|endoftext|> (the completion format), a chat pair through the model's chat template as the
prompt's messages followed by the answer (the chat format). Only the answer's tokens are
targets; both rows of a pair start with the same prompt tokens.

Truncation, when the longer row of a pair does not fit the context (block_size + 1 tokens):
the prompt loses tokens from its start (its end, next to the answer, is what the answer
follows); if the answers alone still do not fit, the prompt keeps its last token and each
answer is cut at its end. Truncated pairs are counted and the first is named in the run's log.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptkit.data.records import Example, Record, answer_message, encode_lm, lm_example
from gptkit.text.chat import render_chat
from gptkit.text.tokenizer import Tokenizer

Row = tuple[list[int], list[int]]  # (ids, mask): mask[i] = 1 where token i is a target


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    ref: tuple[float, float] | None = None  # the reference model's log-probabilities of (chosen, rejected)


def encode_answer(fmt: str, record: dict, side: str, tokenizer: Tokenizer) -> tuple[Row, int]:
    """(ids, mask) of the prompt followed by record[side], and where the answer starts."""
    if fmt == "chat_preference":
        ids, mask = render_chat(tokenizer, [*record["prompt"], answer_message(record[side])],
                                add_generation_prompt=False)
        start = _last_run(mask)  # earlier assistant turns of the prompt are context, not targets
        return (ids, [0] * start + mask[start:]), start
    ids, mask = encode_lm("completion", {"prompt": record["prompt"], "completion": record[side]}, tokenizer)
    return (ids, mask), mask.index(1)


def _last_run(mask: list[int]) -> int:
    """Where the last run of targets starts: the final assistant message."""
    i = len(mask)
    while i > 0 and not mask[i - 1]:  # a template's tokens after the reply (ChatML's newline)
        i -= 1
    while i > 0 and mask[i - 1]:
        i -= 1
    return i


def fit_pair(chosen: Row, rejected: Row, prompt_len: int, block_size: int) -> tuple[Row, Row, bool]:
    """Both rows cut to fit block_size + 1 tokens by the policy above; True when anything was cut."""
    limit = block_size + 1
    excess = max(len(chosen[0]), len(rejected[0])) - limit
    if excess <= 0:
        return chosen, rejected, False
    cut = min(excess, max(prompt_len - 1, 0))  # the first target needs one token before it
    chosen, rejected = ((ids[cut:cut + limit], mask[cut:cut + limit]) for ids, mask in (chosen, rejected))
    return chosen, rejected, True


def pair_examples(fmt: str, records: list[Record], tokenizer: Tokenizer, block_size: int) -> tuple[list[PairExample], dict]:
    """One PairExample per record; stats count the truncated pairs and name the first."""
    out, stats = [], {"truncated": 0, "skipped": 0}
    for rec in records:
        (chosen, c_start), (rejected, r_start) = (encode_answer(fmt, rec.data, s, tokenizer)
                                                  for s in ("chosen", "rejected"))
        chosen, rejected, cut = fit_pair(chosen, rejected, min(c_start, r_start), block_size)
        if cut:
            stats["truncated"] += 1
            stats.setdefault("first_truncated", f"{rec.where}: prompt of {c_start} tokens")
        out.append(PairExample(lm_example(*chosen), lm_example(*rejected)))
    return out, stats
