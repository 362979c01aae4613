"""Pydantic models of every request and response, with OpenAI's field names.

They are the OpenAPI document: what is declared here is what is served. Requests ignore
unknown fields (clients pass extras through `extra_body`); fields OpenAI defines that gptkit
accepts but does not act on say so in their description (see IGNORED_FIELDS).
"""

from __future__ import annotations

import json

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from gptkit.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P

MAX_N = 16  # choices per prompt; the engine's max_batch may be lower (a 400 names it)
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1 - MAX_N  # each sample is seeded with seed + index
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: the rest of the context)

# Accepted for compatibility, not acted on: (endpoint, field) -> why. README and the tests use it.
IGNORED_FIELDS = {
    "user": "an end-user id for OpenAI's abuse monitoring; there is no per-user accounting",
    "logit_bias": "the engine's sampler has no per-token bias",
    "suffix": "insertion needs a model trained for fill-in-the-middle",
    "messages[].name": "the chat template has no participant names",
    "add_special_tokens (/tokenize)": "gptkit tokenizers never add special tokens when encoding",
}


def _ignored(field: str) -> str:
    return f"accepted and ignored: {IGNORED_FIELDS[field]}"


def unicode_text(v):
    """Raise for a string (or strings in a list) with a lone surrogate: JSON can spell one
    (`"\\ud800"`) but it is not Unicode text, and no tokenizer can encode it."""
    for i, text in enumerate([v] if isinstance(v, str) else v if isinstance(v, list) else []):
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                where = f"item {i}, " if not isinstance(v, str) else ""
                raise ValueError(f"not valid Unicode text: a lone surrogate {text[e.start]!r} at "
                                 f"{where}position {e.start}") from None
    return v


Text = Annotated[str, AfterValidator(unicode_text)]  # every request string the server reads


def _optional_fields_take_null(schema: dict, _cls) -> None:
    """The document says what _null_is_default does: a field with a default may be sent as null."""
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if name in required or any(p.get("type") == "null" for p in prop.get("anyOf", [])):
            continue
        meta = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **meta}


class Request(BaseModel):
    # strict: "16" is not an int, "yes" not a bool, true not a token id (JSON numbers still fill floats)
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_optional_fields_take_null)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):  # OpenAI reads "temperature": null as "not given"
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# ------------------------------------------------------------------------------------ requests
class StreamOptions(Request):
    include_usage: bool = False


class JsonSchemaFormat(Request):
    name: Text = Field(max_length=64)
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema the output must validate against")
    strict: bool | None = Field(None, description="always enforced: the output is decoded under the schema's grammar")
    description: Text | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="json_object: any JSON object; json_schema: JSON valid under json_schema.schema")
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(Request):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: Text
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1)
    top_k: int = Field(DEFAULT_TOP_K, ge=0, description="gptkit extension (send it in extra_body); 0 is off")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[Text, list[Text], None] = Field(None, validate_default=True, description=(
        "strings that end a sample, never in the output; up to --max-stop (default 4) of up to "
        "--max-stop-chars (default 256) characters"))
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description=_ignored("logit_bias"))
    user: str | None = Field(None, description=_ignored("user"))
    response_format: ResponseFormat | None = Field(None, description=(
        "structured output, enforced by grammar-constrained decoding (the output parses, or stops at max_tokens "
        "with finish_reason length)"))

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:  # their number and length: limits.py
        stops = [v] if isinstance(v, str) else list(v or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Union[Text, list[Text], list[int], list[list[int]]] = Field(
        description="text, texts, token ids, or lists of token ids (up to --max-prompts, default 64, prompts)")
    max_tokens: int = Field(COMPLETION_MAX_TOKENS, ge=0, description="0 with echo scores the prompt only")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="k: the chosen token's logprob and the top k alternatives")
    echo: bool = Field(False, description="prepend the prompt (and its logprobs) to each choice")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="must equal n when given")
    suffix: str | None = Field(None, description=_ignored("suffix"))

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, v, handler):
        unicode_text(v)  # its own message, not the one below
        try:
            return handler(v)
        except ValueError:  # pydantic lists every union branch it tried: one line instead
            raise ValueError("expected a string, a list of strings, a list of token ids, "
                             "or a list of lists of token ids") from None


class TextPart(Request):
    type: Literal["text"]
    text: Text


class FunctionCall(Request):
    name: Text
    arguments: Text = Field(description="the arguments as a JSON object, in a string")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:  # the chat template writes them back as JSON
        try:
            if isinstance(json.loads(v), dict):
                return v
        except json.JSONDecodeError:
            pass
        raise ValueError(f"expected a JSON object in a string, got {v[:60]!r}")


class ToolCall(Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    # role and tool_calls come first: the checks of tool_call_id and content read them
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="developer is OpenAI's newer name for system; tool carries a tool's result")
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = Field(None, validate_default=True, description="required on a tool message")
    content: Union[Text, list[TextPart], None] = Field(None, validate_default=True, description=(
        "may be null on an assistant message with tool_calls"))
    name: str | None = Field(None, description=_ignored("messages[].name"))

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @field_validator("tool_call_id")
    @classmethod
    def _result_answers_a_call(cls, v, info):  # as OpenAI: a tool result names the call it answers
        if v is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs tool_call_id")
        return v

    @field_validator("content")
    @classmethod
    def _content_or_calls(cls, v, info):
        if v is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("Field required")
        return v


class FunctionSpec(Request):
    name: Text = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict | None = Field(None, description="a JSON schema; the arguments of a forced call follow it")
    strict: bool | None = None


class Tool(Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Request):
    name: Text


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, description="functions the model may call (shown to it by the chat "
                                                       "template)")
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(None, description=(
        "auto (the default with tools): the model decides, calls are read from its reply; required or a named "
        "function: the reply is decoded as calls whose arguments follow the parameters schema; none: no tools"))
    parallel_tool_calls: bool = Field(True, description="false: at most one call per reply")


class TokenizeRequest(Request):
    model: Text | None = Field(None, description="default: the first model served")
    prompt: Text
    add_special_tokens: bool = Field(False, description=_ignored("add_special_tokens (/tokenize)"))


class DetokenizeRequest(Request):
    model: Text | None = Field(None, description="default: the first model served")
    tokens: list[int]


# ------------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A completion, or (object still "text_completion") one streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _no_empty_calls(self, handler):  # OpenAI leaves tool_calls out of a message without calls
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"]
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    @model_serializer(mode="wrap")
    def _only_set(self, handler):  # OpenAI sends {"content": "x"}, not {"role": null, "content": "x"}
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(Delta):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict


class ChatDelta(Delta):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptkit"
    max_model_len: int = Field(description="the context length (prompt + max_tokens)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model: str
    tokenizer_kind: str
    vocab_size: int
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str = Field(description="Jinja equivalent of the template the server renders chat with")
    chat_template_kind: Literal["chatml", "plain", "jinja"]
    chat_template_source: str = Field(description="checkpoint (stored with it), chatml / plain (--chat-template), "
                                      "default (ChatML tokens, no stored template) or fallback (no chat tokens)")
    has_chat_template: bool = Field(description="the checkpoint stores a chat template (it was fine-tuned for chat) "
                                    "or the operator chose one with --chat-template; false: the template above is a "
                                    "default the model never saw (the chat page then offers completion mode)")
    model_max_length: int


class EngineLoad(BaseModel):
    running: int = Field(description="requests in the batch")
    queued: int = Field(description="requests waiting for a slot")
    max_batch: int
    cached_tokens: int = Field(description="KV-cache positions reserved by running requests")
    max_cached_tokens: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: dict[str, EngineLoad]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody
