"""The static-shape decode step (gptkit/static_decode.py) against the eager step and against
transformers: greedy output identical for 64 tokens on GPT-2-shaped random weights (fp32),
mixed-length prompts in one batch, a row joining mid-run, batches padded to a bucket; and the
CUDA-graph path where CUDA is present."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from gptkit.checkpoint.format import load_state
from gptkit.config import SampleConfig, preset
from gptkit.inference.engine import Engine
from gptkit.checkpoint.hf import hf_to_gptkit
from gptkit.model.gpt import GPT
from gptkit.inference.static_decode import bucket

transformers = pytest.importorskip("transformers")

VOCAB, NEW = 300, 64
PROMPT_LENGTHS = (5, 17, 9)  # three rows: a batch padded to a bucket of 4
LATE_LENGTH = 12  # joins after 10 steps


@pytest.fixture(scope="module")
def hf_model():
    # std 0.3 as in test_hf: varied greedy samples whose top-2 logits are not near-ties
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=128,
                                  initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def model(hf_model) -> GPT:
    cfg = dataclasses.replace(preset("gpt2"), n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, block_size=128)
    model = GPT(cfg)
    load_state(model, hf_to_gptkit(hf_model.state_dict(), cfg.n_layer, "random GPT-2"), source="random GPT-2")
    return model.eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS + (LATE_LENGTH,)]


@pytest.fixture(scope="module")
def expected(hf_model, prompts) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                    pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    assert all(len(set(row)) > 10 for row in out)  # varied, not one repeated token
    return out


CUT = (20, 0, 10, 0)  # rows finish at different steps, so the batch shrinks while the others run


def run_engine(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """The first prompts together, the last one joining after 10 steps; row i makes NEW - CUT[i]
    tokens."""
    greedy = [SampleConfig(max_tokens=NEW - cut, temperature=0.0) for cut in CUT]
    handles = [engine.submit(p, g) for p, g in zip(prompts[:-1], greedy)]
    for _ in range(10):
        engine.step()
    handles.append(engine.submit(prompts[-1], greedy[-1]))
    return [h.result()[0].token_ids for h in handles]


def engine_for(model: GPT, device: str = "cpu", **kw) -> Engine:
    return Engine(copy.deepcopy(model), max_batch=6, eos_ids=[], device=device, **kw)


def test_static_and_eager_steps_equal_transformers_greedy(model, prompts, expected):
    want = [row[:NEW - cut] for row, cut in zip(expected, CUT)]
    static, eager = engine_for(model, static_decode=True), engine_for(model, static_decode=False)
    assert static._static is not None and eager._static is None
    assert run_engine(static, prompts) == want
    assert run_engine(eager, prompts) == want
    assert sorted(static._static._steps) == [1, 2, 4]  # 3 rows padded to 4, 4, then 2 and 1 as rows finish


def test_static_step_logits_match_the_eager_step(model, prompts):
    """Not only the argmax: the logits of both steps agree to float rounding."""
    static, eager = engine_for(model, static_decode=True), engine_for(model, static_decode=False)
    for eng in (static, eager):
        for p in prompts[:3]:
            eng.submit(p, SampleConfig(max_tokens=5, temperature=0.0))
        eng.step()  # all three prefilled, one decode step
    tokens = [r.next_token for r in static._rows]
    assert tokens == [r.next_token for r in eager._rows]
    with torch.inference_mode():
        a = static._static(tokens)
        b = eager.model(torch.tensor(tokens)[:, None], kv_cache=eager.cache.rows(0, 3), last_only=True)[:, -1]
    assert torch.allclose(a, b, atol=1e-4)
    assert static.cache.lengths[:3] == eager.cache.lengths[:3] == [n + 2 for n in PROMPT_LENGTHS]


def test_static_decode_is_off_by_default_on_cpu(model):
    assert engine_for(model)._static is None


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert [bucket(b, 6) for b in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [bucket(b, 64) for b in (1, 3, 5, 9, 33, 64)] == [1, 4, 8, 16, 64, 64]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the decode step captured as CUDA graphs")
def test_cuda_graph_step_equals_eager_and_transformers(model, prompts, expected):
    want = [row[:NEW - cut] for row, cut in zip(expected, CUT)]
    graphed = engine_for(model, device="cuda")  # static decode with graphs is the CUDA default
    assert graphed._static is not None and graphed._static.graphs
    assert run_engine(graphed, prompts) == want
    assert run_engine(engine_for(model, device="cuda", static_decode=False), prompts) == want
    assert run_engine(graphed, prompts) == want  # replaying the captured graphs again
