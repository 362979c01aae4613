"""Tool calling through the official `openai` client: tools shown to the model by the chat template,
calls forced by tool_choice ("required", a named function) decoded under their parameters' schema
(on an untrained model: the arguments still validate), calls read out of replies, streamed
tool-call deltas in OpenAI's shape, a history with assistant tool_calls and tool results, and
LangChain's ChatOpenAI (bind_tools, with_structured_output) against the server."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
import torch

from gptkit.checkpoint.format import save_checkpoint
from gptkit.config import ModelConfig
from gptkit.model.gpt import GPT
from gptkit.text.chat import render_chat
from gptkit.text.tokenizer import BPETokenizer, ChatTemplate
from gptkit.text.tools import parse_tool_calls
from live_server import serve_cli

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
       "additionalProperties": False}
CONVERT = {"type": "object", "properties": {"value": {"type": "number"}, "unit": {"enum": ["km", "mi", "公里"]}},
           "required": ["value", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
         {"type": "function", "function": {"name": "convert", "description": "convert a distance",
                                           "parameters": CONVERT}}]
SCHEMAS = {"add": ADD, "convert": CONVERT}
ASK = [{"role": "user", "content": "3 + 4 是多少？"}]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(['<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call> 7 公里'] * 40,
                              vocab_size=400)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(folder / "m", model, tok)
    with serve_cli([str(folder / "m"), "--name", "m"], folder / "serve.log") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def check_calls(message, names=("add", "convert")) -> None:
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_calls_validate_on_an_untrained_model(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required", n=6, seed=1,
                                       max_tokens=200)
    done = [c for c in r.choices if c.finish_reason == "tool_calls"]
    assert len(done) >= 4 and all(c.finish_reason in ("tool_calls", "length") for c in r.choices)
    for c in done:
        check_calls(c.message)


def test_a_named_function_and_one_call_at_most(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=200, seed=2, n=3,
                                       tool_choice={"type": "function", "function": {"name": "convert"}},
                                       parallel_tool_calls=False)
    for c in r.choices:
        if c.finish_reason == "tool_calls":
            check_calls(c.message, names=("convert",))
            assert len(c.message.tool_calls) == 1


def test_streamed_tool_call_deltas_assemble_to_the_calls(client):
    kwargs = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=3)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert finish == whole.finish_reason
    if finish == "tool_calls":
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (t.function.name, t.function.arguments) for t in whole.message.tool_calls]


def test_with_tools_the_text_before_a_call_streams_as_it_comes(client):
    """tool_choice auto: content streams chunk by chunk up to where a call may begin; joined, the stream's
    content and calls are the non-streamed reply's (same seed)."""
    streamed_early = 0
    for seed in range(6):
        kwargs = dict(model="m", messages=ASK, tools=TOOLS, max_tokens=40, seed=seed, temperature=1.0)
        whole = client.chat.completions.create(**kwargs).choices[0]
        content, names, finish, early = [], [], None, 0
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                if c.delta.content:
                    content.append(c.delta.content)
                    early += c.finish_reason is None
                names += [d.function.name for d in c.delta.tool_calls or [] if d.function and d.function.name]
                finish = c.finish_reason or finish
        assert ("".join(content) or None) == whole.message.content and finish == whole.finish_reason
        assert names == [t.function.name for t in whole.message.tool_calls or []]
        streamed_early += len(content) > 2
    assert streamed_early  # some replies arrived in many pieces, not in one at the end


@pytest.mark.parametrize("text, sent", [
    ("Hi there", "Hi there"), ("Hi <tool", "Hi"), ('Hi <tool_call>\n{"a"', "Hi"), ("  lead", "lead"), ("x\n", "x"),
    ("<tool_call>{", ""), ("a < b", "a < b"),
])
def test_what_may_stream_before_a_call(text, sent):
    from gptkit.server.completions import content_before_calls

    assert content_before_calls(text) == sent


def test_a_history_with_calls_and_results_is_accepted(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7"}]
    r = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice="required"), "tool_choice"),  # no tools
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=TOOLS + TOOLS[:1]), "tools"),
    (dict(tools=[TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
          tool_choice="required"), "tools.1.function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": "an object"}}]),
     "tools.0.function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
])
def test_bad_tool_requests_are_400s_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, max_tokens=5, **kwargs)
    assert e.value.body.get("param") == param, e.value.body


def test_a_tool_result_without_its_call_id_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model="m", messages=ASK + [{"role": "tool", "content": "7"}])
    bad_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{a: 1"}}]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK + [bad_call])
    assert e.value.body.get("param") == "messages.1.tool_calls.0.function.arguments", e.value.body


def test_gptkit_templates_write_tools_calls_and_results(tok):
    messages = [{"role": "system", "content": "Be exact."}, *ASK,
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}]},
                {"role": "tool", "tool_call_id": "c", "content": "7"}]
    text = tok.decode(render_chat(tok, messages, tools=TOOLS)[0])
    assert text.startswith("<|im_start|>system\nBe exact.\n\n# Tools\n")
    assert '"name": "convert"' in text and "<tools>\n" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>\n'
            '<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n') in text
    tok.chat_template = ChatTemplate(kind="jinja", end="<|im_end|>", source=(
        "{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% for m in messages %}{{ m['role'] }}:"
        "{{ m['content'] }}{% for c in m.get('tool_calls', []) %}[{{ c['function']['arguments']['a'] }}]{% endfor %}"
        "|{% endfor %}"))
    try:
        assert tok.decode(render_chat(tok, messages, tools=TOOLS)[0]).startswith("add;convert;system:Be exact.|")
        assert "assistant:[3]|tool:7|" in tok.decode(render_chat(tok, messages, tools=TOOLS)[0])
    finally:
        tok.chat_template = None


def test_calls_are_read_from_text_only_when_whole_and_known():
    text = ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "add", "argu\n</tool_call>')
    content, calls = parse_tool_calls(text, {"add"})
    assert [c["function"]["name"] for c in calls] == ["add"] and json.loads(calls[0]["function"]["arguments"]) == {
        "a": 1, "b": 2}
    assert content.startswith("Let me add.") and '"rm"' in content and '"argu' in content


# ------------------------------------------------------------------------------------ LangChain
class Trip(pydantic.BaseModel):
    """A distance to convert."""
    value: int = pydantic.Field(ge=0, le=999)
    unit: Literal["km", "mi"]


def chat_model(client):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="m", base_url=str(client.base_url), api_key="none", max_retries=0, timeout=120,
                      max_tokens=200, temperature=1.0, seed=4)


def test_langchain_bind_tools_with_a_forced_call(client):
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    # strict: the schema gets additionalProperties false (without it, JSON Schema allows other keys)
    reply = chat_model(client).bind_tools([add], tool_choice="add", strict=True, parallel_tool_calls=False).invoke(
        "3 + 4 是多少？")
    assert [c["name"] for c in reply.tool_calls] == ["add"]
    assert set(reply.tool_calls[0]["args"]) == {"a", "b"} and reply.tool_calls[0]["id"].startswith("call_")
    assert add.invoke(reply.tool_calls[0]["args"]) == sum(reply.tool_calls[0]["args"].values())


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(client, method):
    trip = chat_model(client).with_structured_output(Trip, method=method).invoke("Ten miles, please.")
    assert isinstance(trip, Trip) and 0 <= trip.value <= 999
