"""One request can only hurt itself: an error in one request's sampling, stop matching or
decoding fails that request alone, sampling parameters at the edge of float32 never raise, and
every path (error, refusal at submit, cancel) gives its rows and KV-cache positions back."""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gptkit.errors import GptkitError
from gptkit.config import SampleConfig
from gptkit.inference.sampling import SamplingError
from live_server import bpe_tokenizer, serve, tiny_engine


def fails_after(calls: int):
    """A token_bytes that works `calls` times, then raises (stop matching fails mid-request)."""
    count = itertools.count()

    def token_bytes(token_id: int) -> bytes:
        if next(count) >= calls:
            raise RuntimeError("cannot decode")
        return b"?"
    return token_bytes


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def assert_idle(engine) -> None:
    assert (engine.running, engine.queued, engine.reserved_tokens, len(engine._rows)) == (0, 0, 0, 0)


def test_a_row_that_fails_to_sample_fails_only_its_request(tok):
    """A frequency penalty of -3e38 lifts a token's logit by 3e38 once generated, then past
    float32's range the second time: that row's distribution turns infinite in a decode step
    that batches it with the others (not in its prefill), and only its request fails."""
    engine = tiny_engine(tok)
    prompt = tok.encode("The quick")
    greedy = SampleConfig(max_tokens=8, temperature=0)
    alone = engine.generate(prompt, greedy)[0].token_ids
    bad = SampleConfig(max_tokens=8, temperature=0.8, frequency_penalty=-3e38)
    first, failing, last = engine.submit(prompt, greedy), engine.submit(prompt, bad, n=2), engine.submit(prompt, greedy)
    events = []
    with pytest.raises(SamplingError, match="not finite"):
        events.extend(failing)
    assert any(e.token_id is not None for e in events)  # it failed past its prefill, which sampled a token
    assert first.result()[0].token_ids == alone == last.result()[0].token_ids
    assert_idle(engine)


def test_stop_matching_that_fails_ends_only_its_request(tok):
    engine = tiny_engine(tok, token_bytes=fails_after(2))  # the engine decodes only for stop strings
    prompt = tok.encode("def add")
    good = engine.submit(prompt, SampleConfig(max_tokens=6, temperature=0))
    bad = engine.submit(prompt, SampleConfig(max_tokens=6, temperature=0, stop=["zz"]))
    with pytest.raises(RuntimeError, match="cannot decode"):
        bad.result()
    assert len(good.result()[0].token_ids) == 6
    assert_idle(engine)


@pytest.mark.parametrize("params", [dict(top_p=1e-46), dict(top_p=5e-324), dict(temperature=1e-45),
                                    dict(temperature=1e-300), dict(temperature=1e-45, top_p=1e-46, top_k=3),
                                    dict(temperature=1e-7, frequency_penalty=2.0)])
def test_underflowing_sampling_parameters_sample_greedily(tok, params):
    engine = tiny_engine(tok)
    prompt = tok.encode("The quick")
    penalty = {k: v for k, v in params.items() if k.endswith("penalty")}
    greedy = engine.generate(prompt, SampleConfig(max_tokens=6, temperature=0, **penalty))[0].token_ids
    assert engine.generate(prompt, SampleConfig(max_tokens=6, seed=0, **params))[0].token_ids == greedy
    assert_idle(engine)


def test_a_request_refused_at_submit_holds_nothing(tok):
    engine = tiny_engine(tok)
    for _ in range(3):
        with pytest.raises(GptkitError, match="lone surrogate"):
            engine.submit(tok.encode("x"), SampleConfig(max_tokens=4, stop=["ok", "\ud800"]))
    assert_idle(engine)
    assert len(engine.generate(tok.encode("x"), SampleConfig(max_tokens=4, temperature=0))[0].token_ids) == 4


def test_cancelled_and_finished_requests_give_back_every_position(tok):
    engine = tiny_engine(tok)
    handles = [engine.submit(tok.encode("The"), SampleConfig(max_tokens=20, temperature=0.5), n=2) for _ in range(3)]
    engine.step()
    assert engine.reserved_tokens > 0
    handles[1].cancel()
    for h in (handles[0], handles[2]):
        assert all(c.finish_reason == "length" for c in h.result())
    assert_idle(engine)


# ------------------------------------------------------------------------------------ in a real server
@pytest.mark.slow
def test_bad_requests_interleaved_with_good_streams(tok):
    """Every bad request gets its own answer while four streams run; all four complete and the
    model is idle, with its whole KV cache free, afterwards."""
    from gptkit.server import ServedModel, create_app

    # stop matching fails, in the first stop request's third step and at once in the next: a bug
    # confined to the requests with stop strings
    engine = tiny_engine(tok, context=256, max_batch=8, token_bytes=fails_after(2))
    step = engine.step

    def slow_step() -> None:  # ~1 s per stream, so the bad requests land while they run
        time.sleep(0.005)
        step()

    engine.step = slow_step
    good = {"model": "m", "prompt": "The quick", "max_tokens": 150, "stream": True, "temperature": 0.9,
            "stream_options": {"include_usage": True}}
    bad = [  # (body, status, param)
        ({"top_p": 1e-46}, 200, None), ({"temperature": 1e-45}, 200, None), ({"temperature": 1e-300}, 200, None),
        ({"stop": "\ud800"}, 400, "stop"), ({"prompt": "a\ud800"}, 400, "prompt"),
        ({"prompt": ["ok", "\udfff"]}, 400, "prompt"), ({"max_tokens": "16"}, 400, "max_tokens"),
        ({"stop": "zz"}, 500, None), ({"prompt": ["x"] * 65}, 400, "prompt"), ({"stop": "z" * 257}, 400, "stop"),
        ({"stream": True, "stop": "zz"}, 200, None),  # the stream has begun: its error is an event
    ]
    with serve(create_app([ServedModel("m", engine, tok)])) as url:
        def stream() -> tuple[str | None, int]:
            finish, usage = None, 0
            with httpx.stream("POST", f"{url}/v1/completions", json=good, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
                        usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
            return finish, usage

        def send(case) -> tuple[int, dict | str]:
            fields, _, _ = case
            body = {"model": "m", "prompt": "The", "max_tokens": 5, **fields}
            r = httpx.post(f"{url}/v1/completions", content=json.dumps(body), timeout=60,
                           headers={"Content-Type": "application/json"})
            return r.status_code, r.text if fields.get("stream") else r.json()

        with ThreadPoolExecutor(len(bad) + 4) as pool:
            streams = [pool.submit(stream) for _ in range(4)]
            time.sleep(0.3)
            answers = list(pool.map(send, bad))
            assert [s.result() for s in streams] == [("length", 150)] * 4
        for (fields, status, param), (got, body) in zip(bad, answers):
            assert got == status, (fields, body)
            if status >= 400:
                assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param
        assert '"error"' in answers[-1][1] and "cannot decode" not in answers[-1][1]  # the streamed failure
        load = httpx.get(f"{url}/health").json()["models"]["m"]
        assert (load["running"], load["queued"], load["cached_tokens"]) == (0, 0, 0)
        assert load["max_cached_tokens"] == 8 * 256
