"""Chat messages -> token ids and a loss mask, with the template the tokenizer stores.

Training, `gptkit chat` and the server render conversations here, so all three agree on the tokens.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptkit.errors import GptkitError
from gptkit.text.tokenizer import EOT, IM_END, IM_START, PLAIN_ROLES, ChatTemplate, Tokenizer
from gptkit.text.tools import assistant_text, tools_text

CHAT_TEMPLATES = ("auto", "chatml", "plain")


def use_chat_template(tokenizer: Tokenizer, choice: str = "auto") -> str:
    """Set the template chat uses on `tokenizer` (in memory) and say where it came from:
    'checkpoint' (stored with it), 'chatml' / 'plain' (chosen), 'default' (no stored template,
    ChatML tokens present), or 'fallback' (no chat tokens: plain text)."""
    if choice not in CHAT_TEMPLATES:
        raise GptkitError(f"chat template {choice!r}: expected one of {', '.join(CHAT_TEMPLATES)}")
    has_tokens = _has_chat_tokens(tokenizer)
    if choice == "chatml" and not has_tokens:
        raise GptkitError(f"chat template chatml needs the tokens {IM_START} / {IM_END}, which this tokenizer "
                          "lacks; use --chat-template plain, or fine-tune with a chat dataset (it adds them)")
    if choice != "auto":
        tokenizer.chat_template = ChatTemplate(kind=choice)
        return choice
    if tokenizer.chat_template is not None:
        return "checkpoint"
    tokenizer.chat_template = default_chat_template(tokenizer)
    return "default" if has_tokens else "fallback"


def default_chat_template(tokenizer: Tokenizer) -> ChatTemplate:
    """For a tokenizer without a stored template: ChatML when it has the ChatML tokens (gptkit's
    tokenizers reserve them), else plain text."""
    return ChatTemplate() if _has_chat_tokens(tokenizer) else ChatTemplate(kind="plain")


def _has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.special_id(t) is not None for t in (IM_START, IM_END))


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                train_on: str = "assistant", tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Render messages with the tokenizer's chat template into (ids, mask); a tokenizer without
    a template gets default_chat_template's (ChatML, or plain text without its tokens).

    mask[i] is 1 where token i is a target of the loss: the content and closing token(s) of
    assistant messages. With add_generation_prompt the ids end with the assistant header.
    Message content is encoded with special tokens off: text can never become <|im_end|>.
    tools (OpenAI's `tools` entries) and assistant messages' `tool_calls` are written as
    gptkit.text.tools describes, or handed to an imported template, which writes them its way.
    """
    tpl = tokenizer.chat_template or default_chat_template(tokenizer)
    if tpl.kind == "jinja":
        return _render_jinja(tokenizer, tpl, messages, add_generation_prompt, train_on, tools)
    messages = with_tools(messages, tools)
    if tpl.kind == "plain":
        def header(role: str) -> list[int]:
            return tokenizer.encode(f"{PLAIN_ROLES[role]}:")
        first, end = " ", tokenizer.encode("\n")  # "User: hi\n"; the model writes the space itself
    else:
        start, close = tokenizer.special_id(tpl.start), tokenizer.special_id(tpl.end)
        if start is None or close is None:
            raise GptkitError(f"tokenizer lacks the chat tokens {tpl.start} / {tpl.end}; fine-tune with a chat "
                              "dataset first (gptkit finetune adds them), or use the plain template")

        def header(role: str) -> list[int]:
            return [start] + tokenizer.encode(f"{role}\n")
        first, end = "", [close] + tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    if tpl.default_system and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": tpl.default_system}, *messages]
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in PLAIN_ROLES:
            raise GptkitError(f"message {i}: role {role!r}; expected system, user, assistant or tool")
        if not isinstance(content, str):
            raise GptkitError(f"message {i}: content must be a string")
        head = header(role)
        body = tokenizer.encode(first + content, special=False) + end
        ids += head + body
        # the reply's closing token is a target (ChatML's <|im_end|>); the newline after it is not
        n_target = len(body) - (len(end) - 1 if tpl.kind == "chatml" else 0)
        target = 1 if role == train_on else 0
        mask += [0] * len(head) + [target] * n_target + [0] * (len(body) - n_target)
    if add_generation_prompt:
        head = header("assistant")
        ids += head
        mask += [0] * len(head)
    return ids, mask


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for gptkit's own templates: the tools described at the end of the system message,
    each assistant message's tool calls written into its text."""
    out = [{**m, "content": assistant_text(m.get("content"), m["tool_calls"])} if m.get("tool_calls") else m
           for m in messages]
    if tools:
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tools_text(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tools_text(tools)})
    return out


def fit_conversation(tokenizer: Tokenizer, system: str | None, history: list[dict], max_tokens: int,
                     context: int) -> tuple[list[int], list[dict]]:
    """The rendered prompt of a conversation, and the history it kept: the oldest exchanges
    (user + assistant) are dropped while the prompt and max_tokens outgrow the context; the newest
    message always stays."""
    def render(turns: list[dict]) -> list[int]:
        return render_chat(tokenizer, ([{"role": "system", "content": system}] if system else []) + turns)[0]

    ids = render(history)
    while len(ids) + max_tokens > context and len(history) > 1:
        history = history[2:] if len(history) > 2 else history[-1:]
        ids = render(history)
    return ids, history


# ---------------------------------------------------------------------------- Jinja templates
# Each message's content is replaced by a marker while the template renders, so that the template's
# own text is encoded with special tokens on and the content with them off (a message cannot spell
# <|im_end|>), and so that the loss mask knows where each message is.
_MARK = "\x00gptkit-message-{}\x00"
_MARKS = re.compile("\x00gptkit-message-(\\d+)\x00")


def _render_jinja(tokenizer: Tokenizer, tpl: ChatTemplate, messages: list[dict], add_generation_prompt: bool,
                  train_on: str, tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """render_chat for an imported template: the targets are the content of `train_on` messages and
    the template's text after it up to and including the end-of-turn token. Tools and tool calls go
    to the template as transformers passes them (arguments as objects)."""
    messages = [{**m, "content": m.get("content") or ""} if m.get("tool_calls") else m for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise GptkitError(f"message {i}: content must be a string")
    marked = [{**m, "content": _MARK.format(i), **({"tool_calls": _parsed_calls(m["tool_calls"])}
                                                 if m.get("tool_calls") else {})} for i, m in enumerate(messages)]
    try:
        text = _compiled(tpl.source).render(
            messages=marked, add_generation_prompt=add_generation_prompt, eos_token=tpl.end, bos_token="",
            **({"tools": tools} if tools else {}))
    except (TemplateError, TypeError, ValueError) as e:  # the template's own logic failing on these messages
        raise GptkitError(f"the model's chat template failed: {e}") from None
    pieces = _MARKS.split(text)  # template text, message index, template text, ...
    ids: list[int] = []
    mask: list[int] = []
    target = False  # inside a reply: from its content to the end-of-turn token
    for j, piece in enumerate(pieces):
        if j % 2:
            m = messages[int(piece)]
            part = tokenizer.encode(m["content"], special=False)
            target = m.get("role") == train_on
            ids += part
            mask += [int(target)] * len(part)
            continue
        if target and tpl.end in piece:
            cut = piece.index(tpl.end) + len(tpl.end)
            head, piece = tokenizer.encode(piece[:cut]), piece[cut:]
            ids += head
            mask += [1] * len(head)
        target = False
        part = tokenizer.encode(piece)
        ids += part
        mask += [0] * len(part)
    return ids, mask


def _parsed_calls(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls with their arguments as objects (Jinja templates write them with tojson)."""
    return [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
            if isinstance(c["function"].get("arguments"), str) else c for c in calls]


@lru_cache(maxsize=16)
def _compiled(source: str) -> Template:
    """A template compiled once per source: every chat request renders with it."""
    try:
        return _jinja_env().from_string(source)
    except TemplateError as e:
        raise GptkitError(f"the model's chat template does not parse: {e}") from None


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """As transformers renders chat templates: sandboxed, trim_blocks and lstrip_blocks, and the
    raise_exception helper templates call."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env


def imported_chat_template(tokenizer_config: dict) -> ChatTemplate | None:
    """The chat template a Hugging Face tokenizer_config.json carries, with its end-of-turn token
    (eos_token), or None when it has none."""
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str) or not source:
        return None
    eos = tokenizer_config.get("eos_token") or EOT
    return ChatTemplate(kind="jinja", source=source, end=eos["content"] if isinstance(eos, dict) else eos)
