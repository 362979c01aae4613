"""API keys, per-key rate limits, moderation and the audit log of `gptkit serve`, end to end:
a real `gptkit serve` subprocess (keys file, moderation classifier + blocklist, audit log)
driven by the official `openai` client, and an in-process server whose rate-limit "minute"
is 2 s, so the client's retry after `Retry-After` is tested in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.recipes import moderation_data
from gptkit.checkpoint.format import save_checkpoint
from gptkit.errors import GptkitError
from gptkit.config import ModelConfig, TrainConfig
from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune
from gptkit.model.gpt import GPT
from gptkit.server.audit import AuditLog
from gptkit.server.auth import add_key, load_keys
from gptkit.server.context import RequestRecord
from gptkit.server.moderation import ModerationConfig, Moderator, clauses
from gptkit.server.ratelimit import KeyLimits, Window, duration
from gptkit.text.tokenizer import EOT, IM_END, IM_START, CharTokenizer
from live_server import serve as serve_in_thread, serve_cli

# The LM is overfit on this text, so greedy output after "The answer is:" contains "idiot",
# which the blocklist flags.
LM_TEXT = "The answer is: you idiot. Thank you.\n"


def _train_lm(folder: Path) -> Path:
    tok = CharTokenizer(sorted(set(LM_TEXT)), [EOT, IM_START, IM_END])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64))
    ids = torch.tensor(tok.encode(LM_TEXT * 40))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):  # ~4 s on one core
        ix = torch.randint(len(ids) - 61, (8,))
        loss = model(torch.stack([ids[i:i + 60] for i in ix]), targets=torch.stack([ids[i + 1:i + 61] for i in ix]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(folder, model.eval(), tok)


def _train_classifier(folder: Path) -> Path:
    """The README's moderation path: generated labelled sentences -> a classify fine-tune, at the size
    benchmarks/moderation_adversarial.py measures (2 layers of 64, 300 steps; ~15 s on 2 cores)."""
    data = moderation_data.write(folder / "moderation.jsonl", 600)
    chars = sorted(set(data.read_text(encoding="utf-8")) | set("abcdefghijklmnopqrstuvwxyz .!"))
    torch.manual_seed(0)
    tok = CharTokenizer(chars, [EOT])
    base = save_checkpoint(folder / "base", GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2,
                                                            n_head=2, n_embd=64)), tok)
    cfg = TrainConfig(out_dir=str(folder / "cls"), max_steps=300, batch_size=32, lr=3e-3, warmup_steps=10,
                      optimizer="adamw", eval_interval=300, eval_batches=2, log_interval=300, progress=False)
    finetune(base, [DataSpec(str(data))], cfg, FinetuneConfig(task="classify"), log=lambda m: None)
    return folder / "cls"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("safety")
    keys = d / "keys.jsonl"
    alice = add_key(keys, "alice", None, KeyLimits(), admin=True)
    bob = add_key(keys, "bob", ["lm"], KeyLimits(requests_per_minute=1000, tokens_per_minute=100000))
    (d / "blocklist.txt").write_text("# exact terms\nidiot\n坏蛋\n")
    return {"dir": d, "lm": _train_lm(d / "lm"), "cls": _train_classifier(d), "keys": keys, "alice": alice,
            "bob": bob}


@pytest.fixture(scope="module")
def served(setup):
    """`gptkit serve` with every option of this file; yields its URL."""
    d = setup["dir"]
    args = [str(setup["lm"]), "--name", "lm", "--model", f"other={setup['lm']}", "--api-keys-file", str(setup["keys"]),
            "--moderation", str(setup["cls"]), "--moderation-blocklist", str(d / "blocklist.txt"),
            "--moderate", "input,output", "--moderation-threshold", "0.6", "--moderation-threshold", "violence=0.7",
            "--moderation-every", "4", "--audit-log", str(d / "audit.jsonl")]
    with serve_cli(args, d / "serve.log") as url:
        yield url


def client(url: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries, timeout=60)


# ------------------------------------------------------------------------------------ keys
def test_keys_file_stores_hashes_and_bad_files_are_one_line_errors(tmp_path):
    keys = tmp_path / "k.jsonl"
    key = add_key(keys, "ci", ["m1", "m2"], KeyLimits(requests_per_minute=5))
    line = keys.read_text()
    assert key.startswith("gk-") and key not in line and json.loads(line)["models"] == ["m1", "m2"]
    assert load_keys(keys)[0].limits == KeyLimits(requests_per_minute=5)
    with pytest.raises(GptkitError, match="exists already"):
        add_key(keys, "ci", None, KeyLimits())
    for bad, message in [('{"name": "x"}', "sha256"), ('{"name": "x", "sha256": "' + "0" * 64 + '", "rpm": 1}',
                                                         "unknown field"),
                         ('{"name": "x", "sha256": "' + "0" * 64 + '", "concurrent_requests": 0}', "positive"),
                         ('{"name": "x", "sha256": "' + "0" * 64 + '", "admin": "yes"}', "`admin` must be true or false"),
                         ("not json", "not JSON")]:
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(GptkitError, match=message):
            load_keys(tmp_path / "bad.jsonl")
    r = subprocess.run([sys.executable, "-m", "gptkit", "serve", str(tmp_path), "--api-keys-file",
                        str(tmp_path / "bad.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "gptkit", "keys", "add", "cli", "--file", str(keys), "--rpm", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().startswith("gk-") and r.stdout.strip() not in keys.read_text()
    assert load_keys(keys)[1].name == "cli"
    r = subprocess.run([sys.executable, "-m", "gptkit", "keys", "add", "ops", "--file", str(keys), "--admin"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and load_keys(keys)[2].admin and not load_keys(keys)[1].admin
    listed = subprocess.run([sys.executable, "-m", "gptkit", "keys", "list", "--file", str(keys)],
                            capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert listed[2].endswith("\tadmin") and not listed[1].endswith("admin")
    r = subprocess.run([sys.executable, "-m", "gptkit", "keys", "add", "bad", "--file", str(keys), "--tpm", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, "error: --tpm -1: expected a positive integer (leave it out for no limit)\n")
    assert len(load_keys(keys)) == 3  # nothing written


@pytest.mark.slow
def test_every_route_but_the_open_ones_needs_a_key(served, setup):
    for path in ("/health", "/", "/chat", "/static/chat.js", "/static/chat.css"):  # open: the page asks for a key
        assert httpx.get(served + path).status_code == 200, path
    for path in ("/metrics", "/openapi.json", "/v1/models", "/tokenizer_info", "/docs", "/redoc", "/nothing",
                 "/static/other.js"):
        r = httpx.get(served + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    wrong = "gk-wrong-" + setup["alice"][9:]
    r = httpx.post(f"{served}/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {wrong}"})
    assert r.status_code == 401 and wrong not in r.text
    with pytest.raises(openai.AuthenticationError):
        client(served, wrong).models.list()
    ok = {"Authorization": f"Bearer {setup['alice']}"}
    assert httpx.get(f"{served}/metrics", headers=ok).status_code == 200  # alice is an admin key
    r = httpx.get(f"{served}/metrics", headers={"Authorization": f"Bearer {setup['bob']}"})  # bob is not
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied" and "alice" not in r.text
    assert httpx.get(f"{served}/openapi.json", headers=ok).status_code == 200
    assert httpx.get(f"{served}/docs", headers=ok).status_code == 404  # off with keys: it needs a CDN


@pytest.mark.slow
def test_a_key_sees_and_uses_only_its_models(served, setup):
    assert [m.id for m in client(served, setup["alice"]).models.list()] == ["lm", "other"]
    bob = client(served, setup["bob"])
    assert [m.id for m in bob.models.list()] == ["lm"]
    with pytest.raises(openai.NotFoundError) as forbidden:
        bob.completions.create(model="other", prompt="The", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        bob.completions.create(model="ghost", prompt="The", max_tokens=2)
    # a model the key may not use answers exactly as one that does not exist: existence does not leak
    assert forbidden.value.body["message"].replace("'other'", "'ghost'") == missing.value.body["message"]
    assert "other" not in missing.value.body["message"]
    # and neither 404 counted against bob's requests per minute
    before = bob.models.with_raw_response.list().headers["x-ratelimit-remaining-requests"]
    for _ in range(3):
        with pytest.raises(openai.NotFoundError):
            bob.completions.create(model="ghost", prompt="The", max_tokens=2)
    after = bob.models.with_raw_response.list().headers["x-ratelimit-remaining-requests"]
    assert int(after) == int(before) - 1  # only the second models.list() counted
    r = bob.completions.with_raw_response.create(model="lm", prompt="Thank", max_tokens=3, temperature=0)
    assert r.headers["x-ratelimit-limit-requests"] == "1000" and r.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(r.headers["x-ratelimit-remaining-requests"]) < 1000 and r.headers["x-ratelimit-reset-requests"]


# ------------------------------------------------------------------------------------ moderation
@pytest.mark.slow
def test_moderations_endpoint_in_openais_shape(served, setup):
    c = client(served, setup["alice"])
    texts = ["thank you for the gift, that was kind", "shut up, you worthless loser", "I will stab you tonight",
             "你这个愚蠢的白痴", "今天天气很好", "he is a 坏蛋"]
    res = c.moderations.create(input=texts)
    flagged = [r.flagged for r in res.results]
    assert flagged == [False, True, True, True, False, True], [r.category_scores for r in res.results]
    first = res.results[1].model_dump(exclude_none=True)  # the client declares OpenAI's categories too
    assert set(first["categories"]) == set(first["category_scores"]) == {"harassment", "violence", "blocklist"}
    assert first["categories"]["harassment"] and first["category_scores"]["harassment"] >= 0.6
    assert res.results[5].model_dump()["categories"]["blocklist"]
    assert c.moderations.create(input="please fix the printer before the meeting").results[0].flagged is False
    big = httpx.post(f"{served}/v1/moderations", json={"input": ["thank you " * 4000, "fine " * 6000]},
                     headers={"Authorization": f"Bearer {setup['alice']}"})  # 70,000 characters: refused before work
    assert big.status_code == 400 and big.json()["error"]["param"] == "input" and "--max-moderation-chars" in big.text
    r = httpx.post(f"{served}/v1/moderations", content='{"input": "\\ud800"}',  # a lone surrogate: 400, not 500
                   headers={"Authorization": f"Bearer {setup['alice']}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"]


def test_the_blocklist_sees_through_rewrites(tmp_path):
    (tmp_path / "block.txt").write_text("idiot\n坏蛋\n")
    mod = Moderator(ModerationConfig(blocklist=str(tmp_path / "block.txt")))
    caught = ["you idiots", "you IDIOT", "id1ot", "i d i o t", "i.d.i.o.t", "id\u200biot", "іdiоt", "ＩＤＩＯＴ",
              "坏 蛋", "他是个坏\u200b蛋", "he is a 坏蛋"]
    passed = ["the class idiom", "an idiotic plan", "I have 1 idea", "坏天气", "a b c"]
    assert [v.flagged for v in mod.check(caught)] == [True] * len(caught)
    assert [v.flagged for v in mod.check(passed)] == [False] * len(passed)


def test_clauses_scored_alone_are_those_of_three_words_or_more():
    # short pieces ("haha", "ok,", "，谢谢") are read only within the whole text: a small classifier
    # misreads them alone (false positives 26 -> 10 % with a benign ending, BENCHMARKS.md)
    assert clauses("I will stab you tonight, haha") == ["I will stab you tonight,"]
    assert clauses("hello! I will stab you") == ["I will stab you"]
    assert clauses("the red book, is here. I will kill you") == ["the red book,", "I will kill you"]
    assert clauses("我要揍你，谢谢") == ["我要揍你，"]
    assert clauses("I will stab you") == [] and clauses("ok") == []


@pytest.mark.slow
def test_a_benign_sentence_around_a_flagged_one_does_not_hide_it(served, setup):
    c = client(served, setup["alice"])
    texts = ["I will stab you tonight", "hello! I will stab you tonight", "I will stab you tonight. thank you for the gift",
             "I will stab you tonight, haha", "I will stab you tonight thanks!", "我要揍你，谢谢"]
    assert [r.flagged for r in c.moderations.create(input=texts).results] == [True] * 6


@pytest.mark.slow
def test_a_flagged_prompt_is_a_400_content_filter(served, setup):
    c = client(served, setup["alice"])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="lm", messages=[{"role": "user", "content": "I will kill you tonight"}])
    assert e.value.code == "content_filter" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="lm", prompt=["fine", "you idiot"], max_tokens=2)
    assert e.value.code == "content_filter"


@pytest.mark.slow
def test_a_prompt_over_the_context_is_refused_before_moderation_runs(served, setup):
    c = client(served, setup["alice"])
    with pytest.raises(openai.BadRequestError) as e:  # flagged words, but too long: the cheap check answers
        c.chat.completions.create(model="lm", messages=[{"role": "user", "content": "I will kill you tonight " * 50}],
                                  max_tokens=4)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="lm", prompt="you idiot " * 50, max_tokens=2)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"


@pytest.mark.slow
def test_a_flagged_output_stops_with_content_filter_streaming_too(served, setup):
    c = client(served, setup["alice"])
    r = c.completions.create(model="lm", prompt="Thank you.\nThe answer is:", max_tokens=30, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and "idiot" not in choice.text, choice
    chunks = list(c.completions.create(model="lm", prompt="Thank you.\nThe answer is:", max_tokens=30,
                                       temperature=0, stream=True))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "content_filter" and "idiot" not in text and text == choice.text
    # the logprobs of what was held back do not leak: they spell exactly the text shown
    lp = c.completions.create(model="lm", prompt="Thank you.\nThe answer is:", max_tokens=30, temperature=0,
                              logprobs=1).choices[0]
    assert lp.finish_reason == "content_filter" and "".join(lp.logprobs.tokens) == lp.text == choice.text
    # a clean output is untouched
    ok = c.completions.create(model="lm", prompt="The answer", max_tokens=4, temperature=0).choices[0]
    assert ok.finish_reason == "length" and ok.text == " is:"


# ------------------------------------------------------------------------------------ audit log and metrics
@pytest.mark.slow
def test_audit_log_and_per_key_metrics_name_keys_never_show_them(served, setup):
    c = client(served, setup["bob"])
    c.completions.create(model="lm", prompt="Thank you", max_tokens=3, temperature=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="lm", prompt="you idiot", max_tokens=3)
    metrics = httpx.get(f"{served}/metrics", headers={"Authorization": f"Bearer {setup['alice']}"}).text
    assert 'gptkit_key_requests_total{key="bob",status="200"}' in metrics
    assert 'gptkit_key_tokens_total{key="bob",kind="completion"} ' in metrics
    audit = setup["dir"] / "audit.jsonl"
    deadline = time.monotonic() + 10
    while audit.read_text().count('"bob"') < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    bob = [x for x in lines if x["key"] == "bob" and x["route"] == "/v1/completions" and x["status"] == 200][-1]
    assert bob["model"] == "lm" and bob["prompt_tokens"] == len("Thank you") and bob["completion_tokens"] == 3
    assert bob["latency_ms"] > 0 and bob["moderation"] == "ok" and "prompt" not in bob
    flagged = [x for x in lines if x["key"] == "bob" and x["status"] == 400][-1]
    assert flagged["moderation"].startswith("flagged:input:") and "blocklist" in flagged["moderation"]
    assert flagged["completion_tokens"] == 0
    everything = audit.read_text() + metrics + (setup["dir"] / "serve.log").read_text()
    assert setup["alice"] not in everything and setup["bob"] not in everything
    assert "Thank you" not in audit.read_text()  # no text without --audit-log-text
    # a caller without a key chooses the path's length, not the log's: 200 characters of it are kept
    long = "/v1/" + "x" * 20_000
    assert httpx.get(served + long).status_code == 401
    deadline = time.monotonic() + 10
    while "xxx" not in audit.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    [entry] = [json.loads(line) for line in audit.read_text().splitlines() if "xxx" in line]
    assert entry["status"] == 401 and entry["route"] == long[:200] + f"...(+{len(long) - 200})"


def test_audit_log_rotates_by_size_and_keeps_text_only_when_asked(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", max_bytes=600, backups=2, text=True)
    log.start()
    for i in range(20):
        r = RequestRecord(route="/v1/completions", method="POST", status=200, key_name="k", model="m")
        r.prompt_text, r.completion_text = [f"prompt {i}"], [f"done {i}"]
        log.log(r)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    assert all(p.stat().st_size <= 600 for p in tmp_path.iterdir())
    last = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert last["prompt"] == ["prompt 19"] and last["completion"] == ["done 19"] and last["key"] == "k"


def test_requests_without_a_key_cannot_flood_the_audit_log(tmp_path):
    now = [0.0]
    log = AuditLog(tmp_path / "a.jsonl", noise_per_minute=5, clock=lambda: now[0])
    log.start()
    for i in range(50):  # a flood of 401s with long paths
        log.log(RequestRecord(route="/x" * 5000, method="GET", status=401))
    log.log(RequestRecord(route="/v1/models", method="GET", status=200, key_name="alice"))  # never held back
    now[0] = 61.0
    log.log(RequestRecord(route="/y", method="GET", status=401))  # a new minute: the count, then this one
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x.get("status") for x in lines] == [401] * 5 + [200, 401, 401]
    assert lines[6]["unlogged_401s"] == 45 and lines[7]["route"] == "/y"
    assert all(len(x.get("route", "")) < 260 for x in lines)  # and each logged path is cut short


# ------------------------------------------------------------------------------------ rate limits
def test_window_counts_wait_and_reset():
    w = Window(limit=3, period=10.0)
    w.add(0.0, 2)
    w.add(4.0, 1)
    assert w.remaining(5.0) == 0 and w.wait(5.0) == pytest.approx(5.0) and w.reset(5.0) == pytest.approx(9.0)
    assert w.remaining(10.5) == 2 and w.wait(10.5) == 0.0 and w.remaining(14.5) == 3
    assert [duration(s) for s in (0.02, 1.0, 59.2, 360)] == ["20ms", "1s", "1m0s", "6m0s"]


@pytest.fixture(scope="module")
def limited(setup):
    """In-process server whose rate-limit window is 2 s; keys: `rpm` 2 requests per window,
    `tpm` 5 tokens per window, `one` 1 request at a time; public /metrics; an audit log with text."""
    from gptkit.inference.engine import Engine
    from gptkit.server import ServedModel, ServerConfig, create_app
    from gptkit.server.auth import ApiKey, hash_key

    model = open_checkpoint(setup["lm"]).model
    tok = open_tokenizer(setup["lm"])
    engine = Engine(model, max_batch=2, token_bytes=tok.token_bytes, eos_ids=())
    keys = [ApiKey("rpm", hash_key("k-rpm"), limits=KeyLimits(requests_per_minute=2)),
            ApiKey("tpm", hash_key("k-tpm"), limits=KeyLimits(tokens_per_minute=5)),
            ApiKey("one", hash_key("k-one"), limits=KeyLimits(concurrent_requests=1))]
    audit = AuditLog(setup["dir"] / "limited-audit.jsonl", text=True)
    app = create_app([ServedModel("lm", engine, tok)], ServerConfig(api_keys=keys, limit_window_s=2.0,
                                                                    public_metrics=True, audit=audit))
    with serve_in_thread(app) as url:
        yield url


def test_over_the_request_limit_is_429_and_the_client_retries_after_retry_after(limited):
    c = client(limited, "k-rpm")
    time.sleep(2.1)  # an empty window
    first = c.models.with_raw_response.list()
    assert first.headers["x-ratelimit-remaining-requests"] == "1" and first.headers["x-ratelimit-limit-requests"] == "2"
    c.models.list()
    r, limited_at = httpx.get(f"{limited}/v1/models", headers={"Authorization": "Bearer k-rpm"}), time.monotonic()
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["retry-after"] in ("1", "2") and 0 < int(r.headers["retry-after-ms"]) <= 2000
    assert r.headers["x-ratelimit-remaining-requests"] == "0" and "k-rpm" not in r.text
    with pytest.raises(openai.RateLimitError):
        c.models.list()
    # one retry only: it succeeds because the client slept for retry-after-ms (an early retry is another 429)
    assert [m.id for m in client(limited, "k-rpm", retries=1).models.list()] == ["lm"]
    assert time.monotonic() - limited_at >= int(r.headers["retry-after-ms"]) / 1000 - 0.05


def test_keys_list_and_revoke(tmp_path):
    from typer.testing import CliRunner

    from gptkit.cli import app

    keys, run = str(tmp_path / "keys.jsonl"), CliRunner().invoke
    assert run(app, ["keys", "add", "a", "--file", keys, "--rpm", "3"]).exit_code == 0
    key_b = run(app, ["keys", "add", "b", "--file", keys, "--models", "demo"]).stdout.strip()
    listed = run(app, ["keys", "list", "--file", keys])
    assert listed.stdout == "a\tmodels: all\tlimits: rpm 3\nb\tmodels: demo\tlimits: none\n"
    assert key_b not in listed.output and key_b not in (tmp_path / "keys.jsonl").read_text()
    assert run(app, ["keys", "revoke", "a", "--file", keys]).exit_code == 0
    assert [k.name for k in load_keys(keys)] == ["b"]
    gone = run(app, ["keys", "revoke", "a", "--file", keys])
    assert gone.exit_code == 2 and f"error: {keys}: no key named 'a' (keys: b)" in gone.output


def test_a_request_must_fit_in_the_tokens_left_this_minute():
    from gptkit.server.ratelimit import KeyLimiter, KeyLimits, RateLimited

    now = [100.0]
    limiter = KeyLimiter(KeyLimits(tokens_per_minute=10), period=60, clock=lambda: now[0])
    limiter.check_cost(10)  # fits an empty window
    limiter.charge(7)
    with pytest.raises(RateLimited, match="may use 4 tokens and 3 of the key's 10 tokens per minute are left") as e:
        limiter.check_cost(4)
    assert e.value.wait == pytest.approx(60.0)  # when the 7 age out
    limiter.check_cost(3)
    now[0] += 61
    limiter.check_cost(10)
    with pytest.raises(RateLimited, match="may use 11 tokens"):
        limiter.check_cost(11)


def test_tokens_and_concurrency_limits(limited):
    c = client(limited, "k-tpm")
    # what a request may use (10 prompt + 4 completion tokens) is checked before any work, against the
    # key's 5 tokens per minute: not only whether anything is left
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.with_raw_response.create(model="lm", prompt="The answer", max_tokens=4, temperature=0)
    assert "this request may use 14 tokens" in e.value.message and "lower max_tokens or n" in e.value.message
    assert e.value.response.headers["x-ratelimit-limit-tokens"] == "5"
    assert client(limited, "k-tpm", retries=1).completions.create(model="lm", prompt="T", max_tokens=1).choices

    one = client(limited, "k-one")
    stream = one.completions.create(model="lm", prompt="The", max_tokens=60, stream=True)
    next(iter(stream))  # in flight
    with pytest.raises(openai.RateLimitError, match="in flight"):
        one.models.list()
    stream.close()
    deadline = time.monotonic() + 5
    while True:  # the slot is back once the server sees the client gone
        try:
            one.models.list()
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    metrics = httpx.get(f"{limited}/metrics").text  # --public-metrics: no key needed
    assert 'gptkit_key_rate_limited_total{key="one",limit="concurrent"}' in metrics
    assert httpx.get(f"{limited}/v1/models").status_code == 401


def test_audit_log_text_only_when_asked(limited, setup):
    # a prompt no other test sends to this server: the entry found is this request's (the writer is a thread)
    prompt = "you. The answer"
    out = client(limited, "k-one").completions.create(model="lm", prompt=prompt, max_tokens=3, temperature=0)
    path = setup["dir"] / "limited-audit.jsonl"
    mine = f'"prompt": ["{prompt}"]'
    deadline = time.monotonic() + 10
    while mine not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    [entry] = [json.loads(x) for x in path.read_text().splitlines() if mine in x]
    assert entry["key"] == "one" and entry["completion"] == [out.choices[0].text] and entry["completion_tokens"] == 3
