"""`POST /v1/attention`, a gptkit extension (not part of OpenAI's API): the softmax attention
weights of one layer's heads for a text, from the model's inspection pass (gptkit/attention.py).
The chat page's "show attention" toggle draws them."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gptkit.evaluation.attention import attention_maps
from gptkit.server import schemas as S
from gptkit.server.context import current_request
from gptkit.server.errors import APIError
from gptkit.server.state import Server

MAX_TEXT = 20_000  # characters; only the first context's worth of tokens is run anyway


class AttentionRequest(S.Request):
    model: str | None = Field(None, description="a served model (default: the first)")
    # no maxLength in the schema: the body limit (413) comes first for long texts, so the handler
    # checks the length itself (400), as the OpenAI routes do for their prompts
    text: str = Field(min_length=1, description=f"the text to run through the model (at most {MAX_TEXT} characters)")
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
                                        "its first tokens ran")
    weights: list[list[list[float]]] = Field(description="[head][query][key]; row i sums to 1 over keys 0..i")


def attention_routes(server: Server) -> APIRouter:
    router = APIRouter(prefix="/v1", responses={s: {"model": S.ErrorResponse} for s in (400, 401, 404, 413, 429)})

    @router.post("/attention", response_model=AttentionResponse,
                 summary="Attention weights of a text (gptkit extension)")
    async def attention(body: AttentionRequest) -> AttentionResponse:
        served = server.model(body.model)
        if len(body.text) > MAX_TEXT:
            raise APIError(400, f"text has {len(body.text)} characters; at most {MAX_TEXT}", param="text")
        # a forward on the served weights, off the event loop; the engine's thread only reads them too.
        # Its answer holds heads x tokens^2 weights: the tokens are capped (--max-attention-tokens)
        maps = await asyncio.to_thread(attention_maps, served.engine.model, served.tokenizer, body.text,
                                       server.config.limits.max_attention_tokens)
        if (meter := current_request().meter) is not None:  # counted against the key's tokens per minute
            meter.charge(len(maps.token_ids))
        layer = maps.check(body.layer)
        return AttentionResponse(model=served.name, **maps.to_json(layer))

    return router
