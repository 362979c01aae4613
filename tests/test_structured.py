"""Structured outputs: JSON that always parses, on an untrained random model (the hardest case:
it would never write JSON by itself). The engine's grammar masks, then the server's
response_format through the official `openai` client (create, parse with a pydantic model,
streaming, n > 1)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pydantic
import pytest
import torch

from gptkit.checkpoint.format import save_checkpoint
from gptkit.config import ModelConfig, SampleConfig
from gptkit.errors import GptkitError
from gptkit.inference.constrain import JSON_OBJECT, json_schema_grammar
from gptkit.inference.factory import build_engine
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import BPETokenizer
from live_server import serve_cli

CORPUS = ['{"name": "Ada", "age": 36, "tags": ["x", "y"]} The quick brown fox. 我有一个梦想。 0123456789 true null'] * 40
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "蓝色"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
                "required": ["city"], "additionalProperties": False},
    "score": {"type": "number"}, "ok": {"type": "boolean"}, "note": {"anyOf": [{"type": "string", "maxLength": 6},
                                                                              {"type": "null"}]},
}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
SCHEMAS = [PERSON, JSON_OBJECT, {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
           {"enum": ["yes", "no", "不知道"]}]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()


def test_200_of_200_samples_parse_and_validate_on_an_untrained_model(model, tok):
    engine = build_engine(model, tok, max_batch=8, keep_model=True)
    counts = {"valid": 0, "length": 0}
    prompt = tok.encode("Describe a person:")
    for i in range(25):  # 25 requests x n 8 = 200 samples, in batches of 8 rows
        schema = SCHEMAS[i % len(SCHEMAS)]
        params = SampleConfig(max_tokens=96, temperature=1.0, seed=i, grammar=json_schema_grammar(schema))
        for c in engine.generate(prompt, params, n=8):
            if c.finish_reason == "length":  # cut by max_tokens: said, never passed off as complete
                counts["length"] += 1
                continue
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(tok.decode(c.token_ids)), schema)
            counts["valid"] += 1
    assert counts["valid"] + counts["length"] == 200 and counts["valid"] >= 150, counts


def test_constrained_and_free_rows_share_a_batch_and_seeds_repeat(model, tok):
    engine = build_engine(model, tok, max_batch=8, keep_model=True)
    grammar = json_schema_grammar(PERSON)
    free = SampleConfig(max_tokens=20, temperature=1.0, seed=3)
    constrained = SampleConfig(max_tokens=96, temperature=1.0, seed=3, grammar=grammar, logprobs=2)
    alone = engine.generate(tok.encode("hi"), free)[0].token_ids
    handles = [engine.submit(tok.encode("hi"), free), engine.submit(tok.encode("hi"), constrained, n=3)]
    while not all(h.done for h in handles):
        engine.step()
    assert handles[0].result()[0].token_ids == alone  # the grammar rows do not touch the free row
    shared = handles[1].result()
    again = engine.generate(tok.encode("hi"), constrained, n=3)
    assert [c.token_ids for c in shared] == [c.token_ids for c in again]
    for c in shared:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(tok.decode(c.token_ids)), PERSON)
        assert all(lp is not None and lp <= 0 for lp in c.logprobs)  # of the constrained distribution


@pytest.mark.parametrize("schema, message", [
    ({"$ref": "#/missing"}, "Pointer '/missing' does not exist"),
    ({"type": "strang"}, "Invalid type: strang"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable schema"),
    ({"not": {"type": "string"}}, 'Unimplemented keys: ["not"]'),  # never approximated: refused
    (["not", "a", "schema"], "must be a JSON object"),
    ({"enum": ["x" * 1000] * 70}, "at most 65,536"),  # the documented size limit
])
def test_a_schema_that_cannot_be_enforced_is_one_line(model, tok, schema, message):
    engine = build_engine(model, tok, keep_model=True)
    with pytest.raises(GptkitError, match="json_schema") as e:
        engine.grammar_vocab.check(json_schema_grammar(schema))
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def client(tmp_path_factory, model, tok):
    folder = tmp_path_factory.mktemp("structured")
    save_checkpoint(folder / "m", model, tok)
    with serve_cli([str(folder / "m"), "--name", "m"], folder / "serve.log") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int
    ok: bool


def test_openai_client_json_object_json_schema_and_parse(client):
    chat = [{"role": "user", "content": "给我一个 JSON 对象"}]
    r = client.chat.completions.create(model="m", messages=chat, response_format={"type": "json_object"},
                                       max_tokens=120, n=4, seed=1)
    assert any(c.finish_reason == "stop" for c in r.choices)
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.finish_reason == "length"
    r = client.chat.completions.create(model="m", messages=chat, max_tokens=120, seed=2, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    else:
        assert r.choices[0].finish_reason == "length"
    parsed = [client.chat.completions.parse(model="m", messages=chat, response_format=Person, max_tokens=120, seed=s)
              for s in range(3)]
    done = [p.choices[0] for p in parsed if p.choices[0].finish_reason == "stop"]
    assert done, "no parse request finished within max_tokens"
    assert all(isinstance(c.message.parsed, Person) for c in done)
    r = client.completions.create(model="m", prompt="JSON:", max_tokens=120, seed=4,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "answer", "schema": SCHEMAS[3]}}})
    assert r.choices[0].finish_reason == "stop"  # a three-word enum always fits
    assert json.loads(r.choices[0].text) in ["yes", "no", "不知道"]


def test_streamed_structured_output_parses_when_joined(client):
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=120, seed=5, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    if finish == "stop":
        jsonschema.validate(json.loads(text), PERSON)
    else:
        assert finish == "length"


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strang"}}},
     "response_format.json_schema.schema"),
    ({"type": "yaml"}, None),
])
def test_bad_response_format_is_a_400_naming_the_field(client, fmt, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], response_format=fmt)
    body = e.value.body if isinstance(e.value.body, dict) else {}
    if param:
        assert body.get("param") == param, body
    assert "response_format" in json.dumps(body)



def test_generate_cli_json_schema(tmp_path, model, tok):
    from typer.testing import CliRunner

    from gptkit.cli import app

    save_checkpoint(tmp_path / "m", model, tok)
    (tmp_path / "s.json").write_text(json.dumps({"enum": ["yes", "no", "不知道"]}), encoding="utf-8")
    (tmp_path / "bad.json").write_text('{"not": {"type": "string"}}', encoding="utf-8")
    r = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), "-p", "Q:", "--json-schema", str(tmp_path / "s.json"),
                                 "--seed", "1", "--max-tokens", "30"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Q:") and json.loads(r.output[2:]) in ["yes", "no", "不知道"]
    for schema, message in [("bad.json", 'Unimplemented keys: ["not"]'), ("none.json", "cannot read the JSON schema")]:
        r = CliRunner().invoke(app, ["generate", str(tmp_path / "m"), "-p", "Q:", "--json-schema", str(tmp_path / schema)])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and message in r.output, r.output


def test_a_grammar_that_fails_in_the_engine_fails_its_request_alone(model, tok):
    engine = build_engine(model, tok, max_batch=8, keep_model=True)
    good = engine.submit(tok.encode("hi"), SampleConfig(max_tokens=5, temperature=0))
    bad = engine.submit(tok.encode("hi"), SampleConfig(max_tokens=5, grammar="start: %json {\"type\": 3}"), n=2)
    while not (good.done and bad.done):
        engine.step()
    assert len(good.result()[0].token_ids) == 5
    with pytest.raises(GptkitError, match="json_schema"):
        bad.result()
    assert engine.running == 0 and engine.reserved_tokens == 0  # nothing left behind
