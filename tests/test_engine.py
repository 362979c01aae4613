"""The inference engine against naive paths: uncached full forwards, single sequences, a plain
forward's log_softmax; plus sampling, stop strings, streaming, cancel and the scheduler."""

from __future__ import annotations

import asyncio
import copy
import re
import threading

import pytest
import torch
import torch.nn.functional as F

from gptkit.errors import GptkitError
from gptkit.config import ModelConfig, SampleConfig
from gptkit.inference.engine import Engine
from gptkit.inference.requests import Event
from gptkit.text.stream import TextStream, completion_text
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=64)).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: peaked logits, so greedy has no near-ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
        # Zero logits for specials and raw bytes (the head is tied to wte): greedy text is then
        # made of the training characters, and tests can pick stop strings from it.
        m.wte.weight[:259] = 0.0
    return m


def engine(model: GPT, tok=None, **kw) -> Engine:
    return Engine(copy.deepcopy(model), token_bytes=tok.token_bytes if tok else None, **kw)


def greedy(max_tokens: int, **kw) -> SampleConfig:
    return SampleConfig(max_tokens=max_tokens, temperature=0.0, **kw)


@torch.no_grad()
def reference_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding with a full, uncached forward pass for every token."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(tok, lengths=(3, 11, 1, 7)) -> list[list[int]]:
    ids = tok.encode(TEXT * 2)
    return [ids[i:i + n] for i, n in enumerate(lengths)]


# ------------------------------------------------------------------------------- decoding equals naive paths
def test_cached_greedy_equals_uncached(model, tok):
    prompt = prompts(tok)[1]
    [out] = engine(model).generate(prompt, greedy(20))
    assert out.token_ids == reference_greedy(model, prompt, 20)
    assert out.finish_reason == "length"


def test_batched_greedy_equals_single_for_mixed_lengths(model, tok):
    eng = engine(model, max_batch=4)
    lengths = [15, 4, 9, 12]
    handles = [eng.submit(p, greedy(n)) for p, n in zip(prompts(tok), lengths)]
    outs = [h.result()[0].token_ids for h in handles]
    # rows finish at different steps, so the batch is compacted while others keep decoding
    for p, n, out in zip(prompts(tok), lengths, outs):
        [single] = engine(model, max_batch=1).generate(p, greedy(n))
        assert out == single.token_ids == reference_greedy(model, p, n)


def test_n_samples_share_the_prefill(model, tok):
    prompt = prompts(tok)[1]
    outs = engine(model, max_batch=4).generate(prompt, greedy(10), n=3)
    assert [o.token_ids for o in outs] == [reference_greedy(model, prompt, 10)] * 3


def test_request_submitted_while_others_run_joins(model, tok):
    eng = engine(model, max_batch=4)
    p = prompts(tok)
    first = eng.submit(p[0], greedy(25))
    for _ in range(5):
        eng.step()
    assert eng.running == 1
    late = eng.submit(p[1], greedy(8))
    eng.step()
    assert eng.running == 2 and eng.queued == 0  # joined the running batch
    assert late.result()[0].token_ids == reference_greedy(model, p[1], 8)
    assert first.result()[0].token_ids == reference_greedy(model, p[0], 25)
    assert eng.running == 0


def test_scheduler_thread_serves_concurrent_submitters(model, tok):
    eng = engine(model, max_batch=3)  # fewer rows than requests: some wait in the queue
    eng.start()
    try:
        p = prompts(tok, lengths=(2, 5, 8, 3, 6))
        results: dict[int, list[int]] = {}

        def client(i: int) -> None:
            results[i] = [e.token_id for e in eng.submit(p[i], greedy(6 + i)) if e.token_id is not None]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(p))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert {i: results[i] for i in range(len(p))} == {i: reference_greedy(model, p[i], 6 + i) for i in range(len(p))}
    finally:
        eng.shutdown()


def test_async_consumer(model, tok):
    eng = engine(model)
    prompt = prompts(tok)[0]

    async def consume() -> list[int]:
        return [e.token_id async for e in eng.submit(prompt, greedy(7)).aiter() if e.token_id is not None]

    try:
        assert asyncio.run(consume()) == reference_greedy(model, prompt, 7)
    finally:
        eng.shutdown()


# ------------------------------------------------------------------------------- logprobs
@torch.no_grad()
def test_logprobs_equal_log_softmax_of_plain_forward(model, tok):
    prompt = prompts(tok)[1]
    eng = engine(model, max_batch=2)
    [out] = eng.generate(prompt, greedy(6, logprobs=3))
    logp = F.log_softmax(model(torch.tensor([prompt + out.token_ids]))[0], dim=-1)  # (T, V)
    rows = logp[len(prompt) - 1:-1]  # the distributions the generated tokens came from
    assert out.logprobs == pytest.approx(rows.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0].tolist(), abs=1e-4)
    for top, row in zip(out.top_logprobs, rows):
        values, ids = row.topk(3)
        assert list(top) == ids.tolist()
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    [echo] = eng.prompt_logprobs([prompt], top_k=2)
    assert echo[0] == (None, {})
    expected = logp[:len(prompt) - 1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    assert [lp for lp, _ in echo[1:]] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 for _, top in echo[1:])


# ------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible(model, tok):
    prompt = prompts(tok)[1]
    params = SampleConfig(max_tokens=20, temperature=1.5, seed=7)
    a = engine(model).generate(prompt, params, n=2)
    b = engine(model).generate(prompt, params, n=2)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert a[0].token_ids != a[1].token_ids  # each sample has its own stream
    other = engine(model).generate(prompt, SampleConfig(max_tokens=20, temperature=1.5, seed=8))
    assert other[0].token_ids != a[0].token_ids


def test_a_seeded_request_samples_the_same_beside_other_requests(model, tok):
    """Its tokens depend on its seed alone: not on the rows around it, nor on when it joined."""
    p = prompts(tok)
    params = SampleConfig(max_tokens=15, temperature=1.5, top_p=0.9, seed=11)
    [alone] = engine(model).generate(p[1], params)
    eng = engine(model, max_batch=4)
    others = [eng.submit(p[0], SampleConfig(max_tokens=20, temperature=0.7)), eng.submit(p[2], greedy(5))]
    eng.step()
    eng.step()
    beside = eng.submit(p[1], params)
    assert beside.result()[0].token_ids == alone.token_ids
    assert all(len(h.result()[0].token_ids) for h in others)


def test_ids_beyond_the_tokenizer_are_never_sampled(model, tok):
    """A model vocabulary wider than the tokenizer's (padded, or an imported model's): the engine
    samples only ids the tokenizer can decode, at any temperature."""
    prompt = prompts(tok)[1]
    limit = tok.vocab_size - 5
    wild = SampleConfig(max_tokens=60, temperature=5.0, seed=3)
    free = engine(model).generate(prompt, wild, n=4)
    assert any(t >= limit for c in free for t in c.token_ids)  # the test can fail: such ids do come up
    capped = engine(model, vocab_size=limit).generate(prompt, wild, n=4)
    assert all(t < limit for c in capped for t in c.token_ids)


def test_top_k_1_and_tiny_top_p_are_greedy(model, tok):
    prompt = prompts(tok)[0]
    expected = reference_greedy(model, prompt, 12)
    eng = engine(model)
    for params in (SampleConfig(max_tokens=12, top_k=1), SampleConfig(max_tokens=12, top_p=1e-6)):
        assert eng.generate(prompt, params)[0].token_ids == expected


def test_presence_penalty_prevents_repeats(model, tok):
    prompt = prompts(tok)[0]
    plain = engine(model).generate(prompt, greedy(40))[0].token_ids
    assert len(set(plain)) < len(plain)  # the premise: greedy alone repeats itself
    penalised = engine(model).generate(prompt, greedy(40, presence_penalty=1e4))[0].token_ids
    assert len(set(penalised)) == len(penalised)


# ------------------------------------------------------------------------------- stops
def test_stop_token_ends_without_emitting_it(model, tok):
    prompt = prompts(tok)[1]
    full = reference_greedy(model, prompt, 20)
    stop_id = full[5]
    [out] = engine(model).generate(prompt, greedy(20, stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop"
    assert out.token_ids == full[:full.index(stop_id)]


def test_stop_string_spanning_tokens_cuts_text_exactly(model, tok):
    prompt = tok.encode("the lazy ")
    full = reference_greedy(model, prompt, 30)
    text = tok.decode(full)
    stop = text[6:9]  # three characters: three tokens of the char tokenizer
    expected = text[:text.index(stop)]
    eng = engine(model, tok)
    handle = eng.submit(prompt, greedy(30, stop=["NEVER", stop]))
    stream = TextStream(tok, ["NEVER", stop])
    streamed = "".join(stream.push(e) for e in handle)
    [out] = handle.result()
    assert out.finish_reason == "stop"
    assert completion_text(tok, out) == streamed == expected
    assert tok.decode(out.token_ids).startswith(expected + stop)  # generation stopped on the match


# ------------------------------------------------------------------------------- streaming text
@pytest.mark.parametrize("text", ["中文测试，好的", "emoji 🙂👍🏽 end", "mixé 字 🚀"])
def test_text_stream_never_splits_a_character(tok, text):
    ids = tok.encode(text)  # characters unseen in training become one token per UTF-8 byte
    assert len(ids) > len(text)
    stream = TextStream(tok)
    deltas = [stream.push(Event(0, t)) for t in ids] + [stream.push(Event(0, None, finish_reason="length"))]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert all(d.encode("utf-8").decode("utf-8") == d for d in deltas)


def test_text_stream_holds_back_a_possible_stop_string(tok):
    stream = TextStream(tok, stop=["dog!"])
    deltas = [stream.push(Event(0, t)) for t in tok.encode("hot do")]
    assert "".join(deltas) == "hot "  # "do" may start "dog!"
    assert stream.push(Event(0, tok.encode("t")[0])) == "dot"  # it did not
    assert stream.push(Event(0, None, finish_reason="length")) == ""


# ------------------------------------------------------------------------------- cancel, limits, errors
def test_prompt_logprobs_run_on_the_scheduler_thread_with_the_same_numbers(model, tok):
    ps = prompts(tok)
    eng = engine(model)
    inline = eng.prompt_logprobs(ps, top_k=3)
    eng.start()
    try:
        ran_on = []
        real = eng._prompt_logprobs
        eng._prompt_logprobs = lambda p, k: ran_on.append(threading.current_thread().name) or real(p, k)
        assert eng.prompt_logprobs(ps, top_k=3) == inline
        assert ran_on == ["gptkit-engine"]
    finally:
        eng.shutdown()
    assert eng.prompt_logprobs(ps[:1]) == [[(lp, {}) for lp, _ in inline[0]]]  # inline again


def test_serial_main_thread_keeps_the_scheduler_threads_count():
    """The main thread drops to one torch thread; the scheduler thread gets the original count."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from gptkit.config import ModelConfig\n"
            "from gptkit.inference.engine import Engine\nfrom gptkit.inference.threads import serial_main_thread\n"
            "from gptkit.model.gpt import GPT\n"
            "serial_main_thread()\n"
            "e = Engine(GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)))\n"
            "e.start()\n"
            "e._prompt_logprobs = lambda p, k: torch.get_num_threads()\n"
            "print(torch.get_num_threads(), e.prompt_logprobs([[1, 2]]))\n"
            "e.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2"]


def test_cancel_frees_the_slot_at_once(model, tok):
    eng = engine(model, max_batch=1)
    p = prompts(tok)
    long = eng.submit(p[0], greedy(60))
    eng.step()
    waiting = eng.submit(p[1], greedy(5))
    eng.step()
    assert (eng.running, eng.queued) == (1, 1)  # the only row is taken
    long.cancel()
    assert eng.running == 0
    assert waiting.result()[0].token_ids == reference_greedy(model, p[1], 5)
    [cancelled] = long.result()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 60
    events = list(long)
    assert events[-1].finish_reason == "cancelled"


def test_cached_token_budget_queues_requests(model, tok):
    eng = engine(model, max_batch=4, max_cached_tokens=30)
    p = prompts(tok)
    a, b = eng.submit(p[1], greedy(15)), eng.submit(p[2], greedy(10))  # 26 and 11 tokens
    eng.step()
    assert (eng.running, eng.queued) == (1, 1)
    assert b.result()[0].token_ids == reference_greedy(model, p[2], 10)
    assert a.result()[0].token_ids == reference_greedy(model, p[1], 15)


def test_max_tokens_zero_finishes_at_once(model, tok):
    [out] = engine(model).generate(prompts(tok)[0], greedy(0))
    assert (out.token_ids, out.finish_reason) == ([], "length")


@pytest.mark.parametrize("prompt_len, max_tokens, n, message", [
    (90, 10, 1, "prompt of 90 tokens + max_tokens 10 = 100 > context 96"),
    (0, 5, 1, "prompt is empty"),
    (4, 5, 9, "n=9 must be between 1 and the engine's max_batch=8"),
])
def test_user_errors_are_one_line(model, prompt_len, max_tokens, n, message):
    with pytest.raises(GptkitError, match=re.escape(message)):
        engine(model).submit([1] * prompt_len, greedy(max_tokens), n=n)


def test_stop_strings_need_token_bytes(model):
    with pytest.raises(GptkitError, match="token_bytes"):
        engine(model).submit([1, 2], greedy(3, stop=["x"]))


# ------------------------------------------------------------------------------- int8
@torch.no_grad()
def test_int8_quantized_model_is_close_to_fp32(model, tok):
    prompt = prompts(tok)[1]
    eng = engine(model, quantize="int8")
    x = torch.tensor([prompt])
    ref, got = model(x), eng.model(x)
    # The int8 kernel takes bf16 activations: errors of a few per cent of the logit range, as a bf16 model.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert eng.generate(prompt, greedy(10))[0].token_ids == reference_greedy(model, prompt, 10)
    # an int8 model handed on (gptkit compare quantizes, then the engine sets fp32): the same numbers
    again = engine(copy.deepcopy(eng.model), dtype=torch.float32)
    assert torch.equal(again.model(x), got)


@torch.no_grad()
@pytest.mark.parametrize("in_features", [64, 72, 60])
def test_int8_layer_is_close_to_its_linear_for_any_width(in_features):
    # torch's CPU int8 kernel needs in_features % 16 == 0 (else garbage or a crash): the layer
    # dequantises for the other widths
    from gptkit.model.quantize import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 40)
    x = torch.randn(3, 5, in_features)
    ref, got = linear(x), Int8Linear(linear)(x)
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()


@torch.no_grad()
def test_bf16_engine_matches_a_plain_bf16_model(model, tok):
    prompt = prompts(tok)[1]
    eng = engine(model, dtype=torch.bfloat16)  # on CPU its linear weights are prepacked for oneDNN
    plain = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.tensor([prompt])
    assert torch.allclose(eng.model(x).float(), plain(x).float(), atol=1e-2, rtol=1e-2)
    [out] = eng.generate(prompt, greedy(6))
    assert out.token_ids == reference_greedy(plain, prompt, 6)
