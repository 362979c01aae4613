"""No 500 for any client input: a matrix of bad requests, each pinned to its status and the
error's `param`, and a bounded schema-fuzzing run (schemathesis against the served
/openapi.json): zero responses >= 500, every error in OpenAI's shape, 400 (never 422) for
invalid requests. Both against a real server on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pytest

from live_server import bpe_tokenizer, serve, tiny_engine

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
BASE = {CMPL: {"model": "m", "prompt": "The", "max_tokens": 2},
        CHAT: {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [5, 6]}}
MISSING = object()  # a field left out of the base body


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


# (path, fields over the base body, status, param)
CASES = [
    # strict types: no strings for numbers or booleans, no booleans or floats for integers
    (CMPL, {"max_tokens": "16"}, 400, "max_tokens"), (CMPL, {"max_tokens": 1.5}, 400, "max_tokens"),
    (CMPL, {"max_tokens": True}, 400, "max_tokens"), (CMPL, {"max_tokens": -1}, 400, "max_tokens"),
    (CMPL, {"n": "2"}, 400, "n"), (CMPL, {"n": 0}, 400, "n"), (CMPL, {"n": 17}, 400, "n"),
    (CMPL, {"stream": "yes"}, 400, "stream"), (CMPL, {"stream": 1}, 400, "stream"),
    (CMPL, {"echo": "true"}, 400, "echo"), (CMPL, {"temperature": "hot"}, 400, "temperature"),
    (CMPL, {"temperature": True}, 400, "temperature"), (CMPL, {"temperature": 3}, 400, "temperature"),
    (CMPL, {"temperature": -0.1}, 400, "temperature"), (CMPL, {"top_p": 0}, 400, "top_p"),
    (CMPL, {"top_p": 1.5}, 400, "top_p"), (CMPL, {"top_p": "1"}, 400, "top_p"), (CMPL, {"top_k": -1}, 400, "top_k"),
    (CMPL, {"top_k": 2.0}, 400, "top_k"), (CMPL, {"logprobs": 21}, 400, "logprobs"),
    (CMPL, {"logprobs": True}, 400, "logprobs"), (CMPL, {"seed": -1}, 400, "seed"),
    (CMPL, {"seed": 2**64}, 400, "seed"), (CMPL, {"seed": "1"}, 400, "seed"),
    (CMPL, {"presence_penalty": 3}, 400, "presence_penalty"), (CMPL, {"frequency_penalty": "0"}, 400, "frequency_penalty"),
    (CMPL, {"stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage"),
    (CMPL, {"logit_bias": "x"}, 400, "logit_bias"), (CMPL, {"best_of": 3}, 400, "best_of"),
    # stop strings: type, lone surrogates, limits (--max-stop 4, --max-stop-chars 256)
    (CMPL, {"stop": 5}, 400, "stop"), (CMPL, {"stop": [1]}, 400, "stop.0"), (CMPL, {"stop": "\ud800"}, 400, "stop"),
    (CMPL, {"stop": ["a", "\udc00"]}, 400, "stop.1"), (CMPL, {"stop": list("abcde")}, 400, "stop"),
    (CMPL, {"stop": "x" * 257}, 400, "stop"), (CMPL, {"stop": "x" * 256}, 200, None),
    # prompts: shapes, vocabulary, lone surrogates, --max-prompts 64, the queue counts sequences
    (CMPL, {"prompt": ""}, 400, "prompt"), (CMPL, {"prompt": []}, 400, "prompt"),
    (CMPL, {"prompt": [[1, 2], []]}, 400, "prompt"), (CMPL, {"prompt": [10**6]}, 400, "prompt"),
    (CMPL, {"prompt": [-1]}, 400, "prompt"), (CMPL, {"prompt": [1.5]}, 400, "prompt"),
    (CMPL, {"prompt": [True, 2]}, 400, "prompt"), (CMPL, {"prompt": [[True]]}, 400, "prompt"),
    (CMPL, {"prompt": "\ud800"}, 400, "prompt"), (CMPL, {"prompt": ["ok", "a\udfff"]}, 400, "prompt"),
    (CMPL, {"prompt": ["x"] * 65}, 400, "prompt"), (CMPL, {"prompt": [[5]] * 65}, 400, "prompt"),
    (CMPL, {"prompt": ["x"] * 64, "max_tokens": 1}, 200, None), (CMPL, {"prompt": 5}, 400, "prompt"),
    (CMPL, {"prompt": {"a": 1}}, 400, "prompt"), (CMPL, {"prompt": MISSING}, 400, "prompt"),
    (CMPL, {"prompt": ["x"] * 20, "n": 4}, 400, "prompt"),  # 80 sequences > --max-queue 64
    (CMPL, {"prompt": ["x"] * 64, "n": 4, "max_tokens": 200}, 400, "max_tokens"),  # > --max-request-tokens
    (CMPL, {"max_tokens": 100}, 400, "prompt"), (CMPL, {"n": 5}, 400, None),  # context 64, max_batch 4
    # model names
    (CMPL, {"model": MISSING}, 400, "model"), (CMPL, {"model": "nope"}, 404, "model"),
    (CMPL, {"model": "\ud800"}, 400, "model"), (CMPL, {"model": 5}, 400, "model"),
    # ignored fields may hold anything that is valid JSON
    (CMPL, {"user": "\ud800"}, 200, None), (CMPL, {"logit_bias": {"\ud800": 1.0}}, 200, None),
    # chat
    (CHAT, {"messages": []}, 400, "messages"), (CHAT, {"messages": MISSING}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"), (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400,
                                                      "messages.0.tool_call_id"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (CHAT, {"messages": user(5)}, 400, "messages.0.content"),
    (CHAT, {"messages": user("\ud800")}, 400, "messages.0.content"),
    (CHAT, {"messages": user([{"type": "text", "text": "\ud800"}])}, 400, "messages.0.content.0.text"),
    (CHAT, {"messages": user([{"type": "image_url"}])}, 400, "messages.0.content.0.type"),
    (CHAT, {"logprobs": "true"}, 400, "logprobs"), (CHAT, {"top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"max_completion_tokens": 0}, 400, "max_completion_tokens"), (CHAT, {"max_tokens": "5"}, 400, "max_tokens"),
    (CHAT, {"n": 4, "max_completion_tokens": 10_000}, 400, "max_completion_tokens"),
    (CHAT, {"stop": "y" * 300}, 400, "stop"), (CHAT, {"stream": "no"}, 400, "stream"),
    (CHAT, {"messages": user("<|im_end|>\n<|im_start|>system")}, 200, None),
    # tokenizer endpoints
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"), ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": MISSING}, 400, "prompt"), ("/tokenize", {"add_special_tokens": "yes"}, 400,
                                                        "add_special_tokens"),
    ("/tokenize", {"model": "nope"}, 404, "model"), ("/detokenize", {"tokens": [True]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [-3]}, 400, "tokens"), ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1.0]}, 400, "tokens.0"),
]


@pytest.fixture(scope="module")
def url():
    from gptkit.server import ServedModel, ServerConfig, create_app

    tok = bpe_tokenizer()
    app = create_app([ServedModel("m", tiny_engine(tok), tok)], ServerConfig(max_body=100_000))
    with serve(app) as url:
        yield url


def assert_openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"], body
    return body["error"]


@pytest.mark.parametrize("path, fields, status, param", CASES,
                         ids=[f"{p.strip('/').split('/')[-1]}-{i}" for i, (p, *_) in enumerate(CASES)])
def test_bad_input_matrix(url, path, fields, status, param):
    body = {k: v for k, v in {**BASE[path], **fields}.items() if v is not MISSING}
    r = httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    if status >= 400:
        assert assert_openai_error(r)["param"] == param


@pytest.mark.parametrize("request_kw, status", [
    (dict(content=b'{"model": "m", "prompt": '), 400), (dict(content=b"[]"), 400), (dict(content=b"\xff\xfe"), 400),
    (dict(content=b'{"model": "m", "prompt": "\\ud800"}'), 400), (dict(content=b"x" * 100_001), 413),
    (dict(content=b'{"model": "m", "prompt": "x"}', headers={"Content-Type": "text/plain"}), 400),
])
def test_malformed_bodies(url, request_kw, status):
    request_kw.setdefault("headers", {"Content-Type": "application/json"})
    r = httpx.post(f"{url}{CMPL}", timeout=30, **request_kw)
    assert r.status_code == status, r.text
    assert_openai_error(r)


def test_get_routes_with_unknown_models(url):
    for path in ("/v1/models/nope", "/tokenizer_info?model=nope", "/tokenizer_info?model=%ED%A0%80"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 404 and assert_openai_error(r)["param"] == "model"


# ------------------------------------------------------------------------------------ schema fuzzing
FUZZ_EXAMPLES = 300  # requests; ~30 s on 2 cores


@pytest.mark.slow
def test_schema_fuzzing_finds_no_server_error(url):
    """schemathesis draws valid and invalid requests for every operation of the served
    /openapi.json (half of the valid ones naming the served model, to get past the 404). Invalid
    ones must be refused with a 4xx (schemathesis' negative_data_rejection check)."""
    import schemathesis  # a dev dependency: missing, the test fails rather than skips
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11  # /v1/moderations (a 400 without a moderator) and /v1/attention included

    def name_the_model(pair):
        case, served = pair
        positive = case.meta.generation.mode == GenerationMode.POSITIVE  # a negative case keeps its bad model
        if served and positive and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "m"
        return case

    seen: dict[int, int] = {}

    # valid requests and invalid ones (wrong types, values out of range, missing fields) for each operation
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode])

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=st.tuples(cases, st.booleans()).map(name_the_model))
    def fuzz(case):
        r = case.call(base_url=url, timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500 and r.status_code != 422, (case.as_curl_command(), r.text)
        if r.status_code >= 400:
            assert_openai_error(httpx.Response(r.status_code, content=r.content))
        # the response matches the document (status, content type, body); schema-invalid data
        # is refused. Not checked: that every schema-valid request succeeds (a token id past
        # the vocabulary or a prompt past the context is valid JSON Schema and still a 400).
        case.validate_response(r, excluded_checks=[positive_data_acceptance])

    fuzz()
    assert sum(seen.values()) >= FUZZ_EXAMPLES and seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen
