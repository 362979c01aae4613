"""Moderation: a classifier checkpoint that gptkit fine-tuned itself (`gptkit finetune --task
classify` on {"text", "label"} records), plus an optional blocklist of exact terms.

The classifier's labels are the categories, except the benign ones (`safe_labels`, default
"ok"); a category is flagged when its probability reaches its threshold. A blocklist hit
flags the category "blocklist" with score 1.0. The same verdicts serve

    POST /v1/moderations                 OpenAI's shape: results[].flagged/categories/category_scores
    --moderate input                     a flagged prompt or message is a 400, code "content_filter"
    --moderate output                    a flagged completion stops, finish_reason "content_filter"

Output is checked every `check_every` tokens and at its end, on the whole text so far; the
tokens since the last check are held back until they pass, so flagged text is never sent
(streaming arrives in bursts of `check_every` tokens).

Not trivially bypassed: the classifier scores the whole text and each of its sentences and
clauses on its own, and each category takes its worst score, so a benign sentence before or
after a flagged one does not hide it (a benign word added without punctuation still can: see
BENCHMARKS.md). The blocklist matches a normalised
copy of the text (NFKC, case folded, zero-width characters removed, Cyrillic and Greek
look-alikes folded to Latin, s p a c e d or d.o.t.t.e.d letters and spaces between CJK
characters joined) and a leetspeak-folded one (1 -> i, 0 -> o, ...), with plurals of its
English terms. BENCHMARKS.md has the detection rates on adversarial rewrites, before and after.
"""

from __future__ import annotations

import asyncio
import re
import threading
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gptkit.checkpoint.open import open_checkpoint
from gptkit.errors import GptkitError
from gptkit.inference.requests import Event
from gptkit.server.context import current_request
from gptkit.server.errors import APIError
from gptkit.server.schemas import Text

BLOCKLIST = "blocklist"
MAX_INPUTS = 256  # strings per /v1/moderations request


@dataclass
class ModerationConfig:
    ckpt: str | None = None  # classifier checkpoint; None: the blocklist alone
    blocklist: str | None = None  # a file of terms, one a line ('#' comments)
    moderate_input: bool = False
    moderate_output: bool = False
    thresholds: dict[str, float] = field(default_factory=dict)  # per category
    threshold: float = 0.5  # for the categories not in `thresholds`
    safe_labels: tuple[str, ...] = ("ok",)
    check_every: int = 16  # output tokens between checks


@dataclass
class Verdict:
    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]

    def flagged_categories(self) -> list[str]:
        return [c for c, f in self.categories.items() if f]


def read_blocklist(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path}: blocklist file not found")
    terms = [t.strip() for t in path.read_text(encoding="utf-8").splitlines()]
    return [t for t in terms if t and not t.startswith("#")]


def _term_pattern(term: str) -> str:
    # ASCII words match whole words ("ass" is not in "class"), plurals too; other scripts
    # (Chinese has no spaces between words) match anywhere
    term = normalize(term)
    return rf"(?<![a-z0-9_]){re.escape(term)}(?:e?s)?(?![a-z0-9_])" if term.isascii() else re.escape(term)


_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_LOOKALIKES = str.maketrans("аеорсухіјѕԁοαιενκτρԛ", "aeopcyxijsdoaievktpq")
_LEET = str.maketrans("013457@$", "oieastas")  # not "!" -> "i": it ends sentences (fool! -> fooli)
_SPACED = re.compile(r"(?<!\w)(?:\w[ .\-_*]){2,}\w(?!\w)")  # i d i o t, i.d.i.o.t, i-d-i-o-t
_CJK_GAP = re.compile(r"(?<=[\u3400-\u9fff])[\s.\-_*]+(?=[\u3400-\u9fff])")


def normalize(text: str) -> str:
    """The text as the blocklist reads it (see the module docstring)."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold().translate(_LOOKALIKES)
    text = _CJK_GAP.sub("", text)
    return _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group()), text)


def blocklist_forms(text: str) -> list[str]:
    """The normalised text and its leetspeak-folded twin."""
    norm = normalize(text)
    return [norm, norm.translate(_LEET)]


_CLAUSE_END = re.compile(r"(?<=[.!?;,:\n。！？；，：、])\s*")
_WORD = re.compile(r"[\u3400-\u9fff]|\w+")  # a word, or one CJK character
MIN_CLAUSE_WORDS = 3


def clauses(text: str) -> list[str]:
    """The text's sentences and clauses (split after . ! ? ; , : and their CJK forms, and newlines)
    of at least MIN_CLAUSE_WORDS words (a CJK character counts as one). Shorter ones ("haha", "ok,",
    "，谢谢") are read only within the whole text: alone, a small classifier misreads them."""
    parts = [p for p in _CLAUSE_END.split(text) if len(_WORD.findall(p)) >= MIN_CLAUSE_WORDS]
    return parts if len(parts) > 1 or (parts and parts[0] != text) else []


@torch.no_grad()
def class_probs(model, tokenizer, labels: list[str], text: str, by_clause: bool = True) -> dict[str, float]:
    """Label probabilities of a text, each label taking its highest probability over the text's
    context windows and (by_clause) over each of its sentences and clauses on its own: a benign
    sentence around a flagged one does not hide it. The classifier reads each piece's last token."""
    T = model.config.block_size
    pieces = [text, *clauses(text)] if by_clause else [text]
    windows = []
    for piece in pieces:
        ids = tokenizer.encode(piece) or [tokenizer.eot_id]
        windows += [ids[i:i + T] for i in range(0, len(ids), T)]
    x = torch.tensor([w + [tokenizer.eot_id] * (T - len(w)) for w in windows])[:, :max(map(len, windows))]
    h = model.hidden(x)  # (W, T', C)
    last = torch.tensor([len(w) - 1 for w in windows])
    probs = model.heads["classify"](h[torch.arange(len(windows)), last]).float().softmax(-1)  # (W, L)
    return dict(zip(labels, probs.max(0).values.tolist()))


class Moderator:
    def __init__(self, cfg: ModerationConfig):
        self.cfg = cfg
        self.model, self.tokenizer, self.labels = None, None, []
        if cfg.ckpt:
            loaded = open_checkpoint(cfg.ckpt)
            self.model, self.tokenizer, self.labels = loaded.model, loaded.tokenizer, loaded.meta.labels
            if not self.labels:
                raise GptkitError(f"{cfg.ckpt}: no classification head; fine-tune one with "
                                  "`gptkit finetune BASE data.jsonl --task classify`")
        terms = read_blocklist(cfg.blocklist) if cfg.blocklist else []
        self.blocklist = re.compile("|".join(_term_pattern(t) for t in terms)) if terms else None
        if self.model is None and self.blocklist is None:
            raise GptkitError("moderation needs a classifier checkpoint (--moderation) or a blocklist "
                              "(--moderation-blocklist)")
        self.categories = [lb for lb in self.labels if lb not in cfg.safe_labels] + ([BLOCKLIST] if terms else [])
        unknown = set(cfg.thresholds) - set(self.categories)
        if unknown:
            raise GptkitError(f"moderation threshold for unknown categor{'ies' if len(unknown) > 1 else 'y'} "
                              f"{', '.join(sorted(unknown))}; the categories are {', '.join(self.categories)}")
        self._lock = threading.Lock()  # one forward pass at a time: the CPU is the engines' too

    def _class_probs(self, text: str) -> dict[str, float]:
        return class_probs(self.model, self.tokenizer, self.labels, text)

    def check(self, texts: list[str]) -> list[Verdict]:
        out = []
        for text in texts:
            scores = {}
            if self.model is not None:
                with self._lock:
                    probs = self._class_probs(text)
                scores = {c: probs[c] for c in self.labels if c not in self.cfg.safe_labels}
            if self.blocklist is not None:
                scores[BLOCKLIST] = 1.0 if any(map(self.blocklist.search, blocklist_forms(text))) else 0.0
            flags = {c: s >= self.cfg.thresholds.get(c, self.cfg.threshold) for c, s in scores.items()}
            out.append(Verdict(any(flags.values()), flags, {c: round(s, 6) for c, s in scores.items()}))
        return out

    async def acheck(self, texts: list[str]) -> list[Verdict]:
        return await asyncio.to_thread(self.check, texts)

    # ------------------------------------------------------------------ the server's hooks
    async def check_input(self, texts: list[str], param: str) -> None:
        """400 content_filter when any of a request's texts is flagged."""
        if not self.cfg.moderate_input:
            return
        record = current_request()
        flagged = [c for v in await self.acheck(texts) for c in v.flagged_categories()]
        if flagged:
            cats = ", ".join(sorted(set(flagged)))
            record.moderation = f"flagged:input:{cats}"
            raise APIError(400, f"{param} flagged by moderation ({cats}); nothing was generated", param=param,
                           code="content_filter")
        record.moderation = "ok"

    async def guard(self, gen, events: AsyncIterator) -> AsyncIterator:
        """A Generation's (choice, event, delta) stream with output moderation: each choice's
        events are held until its text passes a check; a flagged choice ends with
        finish_reason "content_filter" and keeps only the text that passed."""
        record = gen.record  # the request's, wherever the stream is consumed
        n = len(gen.choices)
        held: list[list] = [[] for _ in range(n)]
        passed, tokens, done, flagged = [""] * n, [0] * n, set(), set()
        shown = [0] * n  # tokens released per choice: a flagged choice keeps only these (text and logprobs)
        try:
            async for i, ev, delta in events:
                if i in flagged:
                    continue
                held[i].append((i, ev, delta))
                tokens[i] += ev.token_id is not None
                if ev.finish_reason is None and tokens[i] < self.cfg.check_every:
                    continue
                tokens[i] = 0
                text = passed[i] + "".join(d for _, _, d in held[i])
                verdict = (await self.acheck([text]))[0]
                if verdict.flagged:
                    flagged.add(i)
                    record.moderation = f"flagged:output:{', '.join(verdict.flagged_categories())}"
                    held[i] = []
                    yield i, Event(index=ev.index, token_id=None, finish_reason="content_filter"), ""
                else:
                    passed[i] = text
                    shown[i] += sum(ev.token_id is not None for _, ev, _ in held[i])
                    for item in held[i]:
                        yield item
                    held[i] = []
                    if ev.finish_reason is not None:
                        done.add(i)
                if len(done) + len(flagged) == n:
                    break
            record.moderation = record.moderation or "ok"
        finally:
            await events.aclose()  # ends the generation: what still runs (a flagged choice's samples) is cancelled
            for i in flagged:  # what was held back leaves no trace: not in the text, not in the logprobs
                c = gen.choices[i]
                c.text, c.finish_reason = passed[i], "content_filter"
                del c.token_ids[shown[i]:], c.logprobs[shown[i]:], c.tops[shown[i]:]


# ------------------------------------------------------------------ POST /v1/moderations
class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Text | list[Text] = Field(description="a text or a list of texts")
    model: str | None = Field(None, description="ignored: the server has one moderation model")


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


def moderation_routes(moderator: Moderator | None, responses: dict, limits) -> APIRouter:
    router = APIRouter(prefix="/v1", responses=responses)

    @router.post("/moderations", response_model=ModerationResponse)
    async def create_moderation(body: ModerationRequest) -> ModerationResponse:
        if moderator is None:
            raise APIError(404, "moderation is not enabled on this server (start it with --moderation CKPT "
                                "or --moderation-blocklist FILE)", code="moderation_disabled")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > MAX_INPUTS:
            raise APIError(400, f"input: expected 1 to {MAX_INPUTS} texts, got {len(texts)}", param="input")
        limits.check_moderation(texts)  # the classifier's work grows with the text: bounded before it runs
        verdicts = await moderator.acheck(texts)
        name = Path(moderator.cfg.ckpt).name if moderator.cfg.ckpt else BLOCKLIST
        current_request().model = name
        return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=name, results=[
            ModerationResult(flagged=v.flagged, categories=v.categories, category_scores=v.scores) for v in verdicts])

    return router


def parse_thresholds(specs: list[str]) -> tuple[float | None, dict[str, float]]:
    """`--moderation-threshold` values: `CATEGORY=0.8` for one category, `0.7` for the rest."""
    default, per = None, {}
    for spec in specs:
        cat, sep, value = spec.rpartition("=")
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if not 0.0 <= v <= 1.0 or (sep and not cat):
            raise GptkitError(f"--moderation-threshold {spec!r}: expected CATEGORY=P or P, with P in [0, 1]")
        if sep:
            per[cat] = v
        else:
            default = v
    return default, per


def parse_moderate(spec: str) -> tuple[bool, bool]:
    parts = {p.strip() for p in spec.split(",") if p.strip()}
    if not parts <= {"input", "output"}:
        raise GptkitError(f"--moderate {spec!r}: expected input, output or input,output")
    return "input" in parts, "output" in parts
