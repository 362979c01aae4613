"""OpenAI's /v1/completions and /v1/chat/completions: prompts in (encode_prompts, render_chat),
responses or stream chunks out, with logprobs in each endpoint's shape.
"""

from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from gptkit.errors import GptkitError
from gptkit.inference.constrain import json_schema_grammar, tool_call_grammar
from gptkit.inference.requests import check_prompt
from gptkit.server import schemas as S
from gptkit.server.config import ServedModel
from gptkit.server.errors import APIError
from gptkit.server.generation import Choice, EventStream, Generation, sample_config
from gptkit.server.limits import Limits
from gptkit.server.state import Server
from gptkit.text.chat import render_chat
from gptkit.text.tokenizer import Tokenizer
from gptkit.text.tools import CALL_OPEN, parse_tool_calls


# ------------------------------------------------------------------------------------ text edges
def token_text(tok: Tokenizer, token_id: int) -> str:
    """A token as text; a piece of a UTF-8 character is written as OpenAI does, `bytes:\\xe6`."""
    data = tok.token_bytes(token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def encode_prompts(served: ServedModel, prompt: str | list, limits: Limits) -> list[list[int]]:
    """OpenAI's four prompt shapes -> one list of token ids per prompt. Special tokens' text
    in a prompt is encoded as the special token (lm-evaluation-harness relies on it)."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        limits.check_prompts(len(prompt))
    if isinstance(prompt, str):
        prompts = [served.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = served.tokenizer.encode_batch(list(prompt))
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt is empty: expected text or at least one token id", param="prompt")
    check_ids(served, [t for p in prompts for t in p], "prompt")
    return prompts


def check_context(served: ServedModel, prompts: list[list[int]], max_tokens: int, param: str) -> None:
    """400 context_length_exceeded (OpenAI's code) for a prompt that cannot fit with max_tokens."""
    for p in prompts:
        try:
            check_prompt(p, max_tokens, served.engine.config)
        except GptkitError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None


def check_ids(served: ServedModel, ids: Iterable[int], param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < served.vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {served.vocab})", param=param)


# ------------------------------------------------------------------------------------ logprobs
def completion_logprobs(tok: Tokenizer, entries: list[tuple[int, float | None, dict[int, float] | None]],
                        offset: int = 0) -> S.CompletionLogprobs:
    """The legacy logprobs object from (token id, logprob, top alternatives) entries; the
    chosen token is always among its position's top_logprobs (so up to k + 1 of them)."""
    out = S.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tid, lp, top in entries:
        out.tokens.append(token_text(tok, tid))
        out.token_logprobs.append(lp)
        alternatives = None if lp is None else {**(top or {}), tid: lp}
        out.top_logprobs.append(None if alternatives is None else
                                {token_text(tok, t): v for t, v in alternatives.items()})
        out.text_offset.append(offset)
        offset += len(utf8.decode(tok.token_bytes(tid)))
    return out


def chat_logprobs(tok: Tokenizer, entries: list[tuple[int, float | None, dict[int, float] | None]]) -> S.ChatLogprobs:
    def top(t: int, lp: float) -> S.TopLogprob:
        return S.TopLogprob(token=token_text(tok, t), logprob=lp, bytes=list(tok.token_bytes(t)))

    return S.ChatLogprobs(content=[S.TokenLogprob(**top(t, lp).model_dump(),
                                                  top_logprobs=[top(a, v) for a, v in (alts or {}).items()])
                                   for t, lp, alts in entries])


# ------------------------------------------------------------------------------------ /v1/completions
def _head(prefix: str, served: ServedModel) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}


async def completions(server: Server, body: S.CompletionRequest) -> S.Completion | EventStream:
    served = server.model(body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of={body.best_of} must equal n={body.n}: gptkit does not rank extra samples",
                       param="best_of")
    limits = server.config.limits
    limits.check_stop(body.stop)
    prompts = await asyncio.to_thread(encode_prompts, served, body.prompt, limits)  # a long body: off the event loop
    limits.check_tokens(len(prompts), body.n, body.max_tokens)
    check_context(served, prompts, body.max_tokens, "prompt")  # the cheap checks first, moderation after them
    await server.moderate_input([served.tokenizer.decode(p) for p in prompts], "prompt")
    gen = server.generate(served, prompts, await sample_config(served, body, body.max_tokens, body.logprobs),
                          body.n)
    try:
        echoes = await _echoes(served, prompts, body) if body.echo else None
    except BaseException:
        gen.close()
        raise
    head = _head("cmpl", served)
    if body.stream:
        return EventStream(_completion_chunks(gen, head, echoes, body), gen)
    choices = await gen.run()
    return S.Completion(**head, usage=gen.usage(), choices=[
        _completion_choice(served, i, c, echoes[i // body.n] if echoes else None, body.logprobs)
        for i, c in enumerate(choices)])


@dataclass
class Echo:
    """A prompt as echoed: its text and, with logprobs, one entry per prompt token."""

    text: str
    entries: list[tuple[int, float | None, dict[int, float] | None]]


async def _echoes(served: ServedModel, prompts: list[list[int]], body: S.CompletionRequest) -> list[Echo]:
    tok = served.tokenizer
    if body.logprobs is None:
        return [Echo(tok.decode(p), []) for p in prompts]
    # one plain forward pass per prompt, off the event loop
    scored = await asyncio.to_thread(served.engine.prompt_logprobs, prompts, body.logprobs)
    return [Echo(tok.decode(p), [(t, lp, top) for t, (lp, top) in zip(p, s)]) for p, s in zip(prompts, scored)]


def _completion_choice(served: ServedModel, index: int, c: Choice, echo: Echo | None,
                       logprobs: int | None) -> S.CompletionChoice:
    prefix = echo.text if echo else ""
    lp = None
    if logprobs is not None:
        lp = completion_logprobs(served.tokenizer, (echo.entries if echo else []) + c.entries())
    return S.CompletionChoice(index=index, text=prefix + c.text, finish_reason=c.finish_reason, logprobs=lp)


async def _completion_chunks(gen: Generation, head: dict, echoes: list[Echo] | None,
                             body: S.CompletionRequest) -> AsyncIterator[S.Completion]:
    tok = gen.served.tokenizer
    if echoes:
        for i in range(len(gen.choices)):
            echo = echoes[i // body.n]
            lp = completion_logprobs(tok, echo.entries) if body.logprobs is not None else None
            yield S.Completion(**head, choices=[S.CompletionChoice(index=i, text=echo.text, logprobs=lp)])
    async for i, ev, delta in gen.events():
        lp = None
        if body.logprobs is not None and ev.token_id is not None:
            start = len(gen.choices[i].text) - len(delta) + (len(echoes[i // body.n].text) if echoes else 0)
            lp = completion_logprobs(tok, [(ev.token_id, ev.logprob, ev.top_logprobs)], start)
        if delta or lp or ev.finish_reason:
            yield S.Completion(**head, choices=[S.CompletionChoice(index=i, text=delta, logprobs=lp,
                                                                   finish_reason=ev.finish_reason)])
    if body.include_usage:
        yield S.Completion(**head, choices=[], usage=gen.usage())


# ------------------------------------------------------------------------------------ /v1/chat/completions
async def chat_completions(server: Server, body: S.ChatCompletionRequest) -> S.ChatCompletion | EventStream:
    served = server.model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    messages = [chat_message(m) for m in body.messages]
    tools = active_tools(body)
    limits = server.config.limits
    limits.check_stop(body.stop)
    # the tools as the client sent them (fields it left out stay out): the model sees the text it was tuned on
    shown = [t.model_dump(exclude_unset=True) for t in tools]
    ids, _ = await asyncio.to_thread(render_chat, served.tokenizer, messages, tools=shown)  # a long body: off the loop
    # default: the rest of the context (at least 1, so a full context is a 400 naming both numbers)
    max_tokens = (body.max_completion_tokens or body.max_tokens
                  or limits.default_max_tokens(served.context - len(ids), body.n))
    limits.check_tokens(1, body.n, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    check_context(served, [ids], max_tokens, "messages")  # the cheap checks first, moderation after them
    await server.moderate_input([m["content"] for m in messages], "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = await sample_config(served, body, max_tokens, logprobs)
    params.stop += served.tokenizer.chat_template.stop  # the plain template ends at the next role marker
    forced = forced_tools(body, tools)
    if forced:  # the reply is decoded as calls: arguments valid under each function's parameters
        params.grammar = await asyncio.to_thread(tool_grammar, served, body, forced)
    gen = server.generate(served, [ids], params, body.n)
    head = _head("chatcmpl", served)
    names = {t.function.name for t in tools}
    if body.stream:
        return EventStream(_chat_chunks(gen, head, body, names), gen)
    choices = await gen.run()
    tok = served.tokenizer
    return S.ChatCompletion(**head, usage=gen.usage(), choices=[
        S.ChatChoice(index=i, **reply(c.text, c.finish_reason, names, body.parallel_tool_calls),
                     logprobs=chat_logprobs(tok, c.entries()) if body.logprobs else None)
        for i, c in enumerate(choices)])


def chat_message(m: S.ChatMessage) -> dict:
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump(exclude_unset=True) for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def active_tools(body: S.ChatCompletionRequest) -> list[S.Tool]:
    """The tools the model is shown: none with tool_choice "none"; a 400 for a choice without tools."""
    if body.tool_choice is not None and body.tool_choice != "none" and not body.tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    names = [t.function.name for t in body.tools or []]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two functions share a name", param="tools")
    return [] if body.tool_choice == "none" else list(body.tools or [])


def forced_tools(body: S.ChatCompletionRequest, tools: list[S.Tool]) -> list[S.Tool]:
    """The tools a reply must call: all for "required", one for a named choice, none otherwise."""
    choice = body.tool_choice
    if choice == "required":
        return tools
    if isinstance(choice, S.NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        return named
    return []


def tool_grammar(served: ServedModel, body: S.ChatCompletionRequest, tools: list[S.Tool]) -> str:
    """The grammar of the forced calls; a 400 naming tools.N.function.parameters for a schema that
    cannot be enforced (each is checked alone, so the message names the one at fault)."""
    for i, tool in enumerate(body.tools or []):
        if tool in tools and tool.function.parameters is not None:
            try:
                served.engine.grammar_vocab.check(json_schema_grammar(tool.function.parameters))
            except GptkitError as e:
                raise APIError(400, str(e).replace("json_schema:", f"tools.{i}.function.parameters:", 1),
                               param=f"tools.{i}.function.parameters") from None
    grammar = tool_call_grammar([t.model_dump() for t in tools], body.parallel_tool_calls)
    try:
        served.engine.grammar_vocab.check(grammar)
    except GptkitError as e:
        raise APIError(400, f"tools: {e}", param="tools") from None
    return grammar


def reply(text: str, finish: str, names: set[str], parallel: bool = True) -> dict:
    """A choice's message and finish_reason: calls to known tools are read out of the text."""
    content, calls = parse_tool_calls(text, names) if names else (text, [])
    if not calls:
        return {"message": S.AssistantMessage(content=text), "finish_reason": finish}
    calls = calls if parallel else calls[:1]
    return {"message": S.AssistantMessage(content=content, tool_calls=[S.ToolCall(**c) for c in calls]),
            "finish_reason": "tool_calls" if finish == "stop" else finish}


def content_before_calls(text: str) -> str:
    """What of a reply's text can be sent before it ends, as reply() will read it: the text before the first
    `<tool_call>` (or before a tail that may be its start), stripped as reply() strips its content."""
    marker = CALL_OPEN.strip()  # "<tool_call>": reply() reads a call with or without the newline after it
    cut = text.find(marker)
    if cut < 0:
        cut = next((k for k in range(max(0, len(text) - len(marker) + 1), len(text)) if marker.startswith(text[k:])),
                   len(text))
    return text[:cut].strip()


async def _chat_chunks(gen: Generation, head: dict, body: S.ChatCompletionRequest,
                       names: set[str]) -> AsyncIterator[S.ChatCompletionChunk]:
    """The stream of a chat reply. With tools, a choice's text streams as content up to where a call
    may begin (`<tool_call>`, or the start of it); the rest is held until the choice ends (a call must be
    whole to be read), then sent as the remaining content and as tool-call deltas."""
    def chunk(i: int, delta: S.ChatDelta, finish: str | None = None, lp: S.ChatLogprobs | None = None):
        return S.ChatCompletionChunk(**head, choices=[S.ChatChunkChoice(index=i, delta=delta, finish_reason=finish,
                                                                        logprobs=lp)])

    for i in range(len(gen.choices)):  # each choice opens with the role, as OpenAI's stream does
        yield chunk(i, S.ChatDelta(role="assistant", content=""))
    tok = gen.served.tokenizer
    held, sent = [""] * len(gen.choices), [""] * len(gen.choices)
    async for i, ev, delta in gen.events():
        lp = chat_logprobs(tok, [(ev.token_id, ev.logprob, ev.top_logprobs)]) \
            if body.logprobs and ev.token_id is not None else None
        if names:
            held[i] += delta
            safe = content_before_calls(held[i])
            delta, sent[i] = safe[len(sent[i]):], safe
        if delta or lp:
            yield chunk(i, S.ChatDelta(content=delta or None) if names else S.ChatDelta(content=delta), lp=lp)
        if ev.finish_reason:
            finish = ev.finish_reason
            if names:
                r = reply(held[i], finish, names, body.parallel_tool_calls)
                finish, message = r["finish_reason"], r["message"]
                rest = (message.content or "")[len(sent[i]):] if (message.content or "").startswith(sent[i]) else ""
                if rest:
                    yield chunk(i, S.ChatDelta(content=rest))
                for k, call in enumerate(message.tool_calls or []):  # OpenAI's shape: id and name, then arguments
                    yield chunk(i, S.ChatDelta(tool_calls=[S.ToolCallDelta(
                        index=k, id=call.id, type="function", function={"name": call.function.name, "arguments": ""})]))
                    yield chunk(i, S.ChatDelta(tool_calls=[S.ToolCallDelta(
                        index=k, function={"arguments": call.function.arguments})]))
            yield chunk(i, S.ChatDelta(), finish)
    if body.include_usage:
        yield S.ChatCompletionChunk(**head, choices=[], usage=gen.usage())
