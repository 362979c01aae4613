"""`POST /v1/attention`, a gptkit extension (not part of OpenAI's API): the softmax attention
weights of one layer's heads for a text, or for a conversation with its last reply's rows marked,
from the model's inspection pass (gptkit/evaluation/attention.py). The chat page's "show attention"
draws them."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gptkit.evaluation.attention import AttentionMaps, attention_maps, reply_attention_maps
from gptkit.server import schemas as S
from gptkit.server.completions import chat_message
from gptkit.server.context import current_request
from gptkit.server.errors import APIError
from gptkit.server.state import Server
from gptkit.text.chat import render_chat

MAX_TEXT = 20_000  # characters; only the first context's worth of tokens is run anyway


class AttentionRequest(S.Request):
    model: str | None = Field(None, description="a served model (default: the first)")
    # no maxLength in the schema: the body limit (413) comes first for long texts, so the handler
    # checks the length itself (400), as the OpenAI routes do for their prompts
    text: str | None = Field(None, min_length=1, description=f"the text to run through the model (at most {MAX_TEXT} "
                                                             "characters in all); or messages")
    reply: str | None = Field(None, description="with text: a continuation of it, whose rows are marked")
    messages: list[S.ChatMessage] | None = Field(None, min_length=1, description=(
        "a conversation ending with an assistant reply, rendered by the model's chat template; the reply's rows "
        "are marked"))
    layer: int | None = Field(None, description="the layer whose heads are returned (default: the last)")


class AttentionResponse(BaseModel):
    model: str
    text: str
    tokens: list[str] = Field(description="a label per token; pieces of a split character are numbered: 梦¹ 梦²")
    token_ids: list[int]
    n_layer: int
    n_head: int
    layer: int
    truncated: bool = Field(description="the text was longer than the context or --max-attention-tokens: only "
                                        "its first tokens ran (a conversation: its last tokens)")
    marked: list[int] | None = Field(None, description="[start, end): the rows of the reply (with reply or messages)")
    weights: list[list[list[float]]] = Field(description="[head][query][key]; row i sums to 1 over keys 0..i")


def attention_routes(server: Server) -> APIRouter:
    router = APIRouter(prefix="/v1", responses={s: {"model": S.ErrorResponse} for s in (400, 401, 404, 413, 429)})

    @router.post("/attention", response_model=AttentionResponse,
                 summary="Attention weights of a text (gptkit extension)")
    async def attention(body: AttentionRequest) -> AttentionResponse:
        served = server.model(body.model)
        if (body.text is None) == (body.messages is None):
            raise APIError(400, "give text or messages, one of them", param="text")
        param = "text" if body.text is not None else "messages"
        size = len(body.text or "") + len(body.reply or "") + sum(len(m.text) for m in body.messages or [])
        if size > MAX_TEXT:
            raise APIError(400, f"{param} has {size} characters; at most {MAX_TEXT}", param=param)
        if body.messages is not None and (body.messages[-1].role != "assistant" or not body.messages[-1].text):
            raise APIError(400, "messages must end with an assistant reply (its rows are the ones marked)",
                           param=f"messages.{len(body.messages) - 1}")
        # a forward on the served weights, off the event loop; the engine's thread only reads them too.
        # Its answer holds heads x tokens^2 weights: the tokens are capped (--max-attention-tokens)
        maps = await asyncio.to_thread(_maps, served, body, server.config.limits.max_attention_tokens)
        if (meter := current_request().meter) is not None:  # counted against the key's tokens per minute
            meter.charge(len(maps.token_ids))
        layer = maps.check(body.layer)
        return AttentionResponse(model=served.name, **maps.to_json(layer))

    return router


def _maps(served, body: AttentionRequest, max_tokens: int) -> AttentionMaps:
    model, tok = served.engine.model, served.tokenizer
    if body.messages is not None:
        ids, mask = render_chat(tok, [chat_message(m) for m in body.messages], add_generation_prompt=False)
        if not any(mask):  # a template that does not write assistant turns as the model's own tokens
            raise APIError(400, "the model's chat template shows no reply tokens for these messages",
                           param="messages")
        end = max(i for i, m in enumerate(mask) if m) + 1  # the last reply: the last run of target tokens
        start = end - next((k for k, m in enumerate(reversed(mask[:end])) if not m), end)
        return reply_attention_maps(model, tok, ids, (start, end), max_tokens)
    if body.reply is None:
        return attention_maps(model, tok, body.text, max_tokens)
    ids = tok.encode(body.text + body.reply)
    prompt_bytes, seen, start = len(body.text.encode("utf-8")), 0, len(ids)
    for i, t in enumerate(ids):  # the reply starts at the first token that reaches past the prompt's bytes
        seen += len(tok.token_bytes(t))
        if seen > prompt_bytes:
            start = i
            break
    return reply_attention_maps(model, tok, ids, (start, len(ids)), max_tokens)
