"""Evaluation: metric values on hand-checked cases, the code sandbox, perplexity/bpb against a
plain forward pass, and the `evaluate` command's table and JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import gptkit.evaluation.evaluate as ev
from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.cli import app
from test_finetune import CLS, QA, make_base, train_cfg, write_jsonl


# ---------------------------------------------------------------------------- metrics
def test_exact_match_and_token_f1_follow_squad():
    assert ev.exact_match("The Eiffel tower!", "eiffel  Tower") == 1.0
    assert ev.exact_match("85", "58") == 0.0
    assert ev.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert ev.token_f1("", "") == 1.0 and ev.token_f1("x", "") == 0.0


def test_metrics_count_chinese_by_character_and_fold_full_width_punctuation():
    from gptkit.evaluation.text_metrics import bleu_chrf, bleu_tokenizer, exact_match, rouge_l, token_f1, tokens

    assert tokens("是的，我很喜欢看书。") == ["是", "的", "我", "很", "喜", "欢", "看", "书"]
    assert tokens("用 Python 3 写代码！") == ["用", "python", "3", "写", "代", "码"]  # mixed: words and characters
    assert tokens("ＡＢＣ１２３，ok") == ["abc123ok"]  # full-width letters and digits fold to ASCII (NFKC)
    # 6 of 8 characters shared both ways: P = R = F1 = 0.75, as "yes I like reading books" vs "... drinking tea"
    assert token_f1("是的，我很喜欢看书。", "是的，我很喜欢喝茶。") == pytest.approx(0.75)
    assert exact_match("北京。", "北京") == 1.0 and exact_match("北京！", "北京市") == 0.0
    assert exact_match("Ｔｈｅ Ｅｉｆｆｅｌ Ｔｏｗｅｒ！", "eiffel tower") == 1.0
    # ROUGE-L: LCS of 我/喜/欢/书 against 7 and 6 characters -> P 4/7, R 4/6
    assert rouge_l("我非常喜欢这书", "我喜欢那本书") == pytest.approx(2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6))
    assert (bleu_tokenizer(["我有一个梦想"]), bleu_tokenizer(["a dream"])) == ("zh", "13a")
    zh = bleu_chrf(["我有一个梦想。"], ["我有一个梦想。"])
    assert zh["bleu"] == pytest.approx(100.0)
    # one character differs: sacrebleu's zh tokenizer scores it 70.7; its default (13a) sees one word, 0.0
    import sacrebleu

    pred, ref = ["我有一个梦想，今天。"], ["我有一个梦想，明天。"]
    assert bleu_chrf(pred, ref)["bleu"] == pytest.approx(70.71, abs=0.01)
    assert sacrebleu.corpus_bleu(pred, [ref]).score == 0.0


def test_rouge_l_is_the_lcs_f1():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = the cat on the mat (5)
    assert ev.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert ev.rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    assert ev.rouge_l("", "x") == 0.0


def test_accuracy_and_macro_f1():
    m = ev.accuracy_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert m["accuracy"] == 0.75 and m["majority_baseline"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # a: tp1 fp1 fn0; b: tp2 fp0 fn1


def test_bleu_and_chrf_come_from_sacrebleu():
    same = ev.bleu_chrf(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    worse = ev.bleu_chrf(["a dog stood under the table"], ["the cat sat on the mat today"])
    assert worse["bleu"] < 10 and worse["chrf"] < 40


# ---------------------------------------------------------------------------- the sandbox
def test_run_python_passes_fails_and_times_out():
    assert ev.run_python("assert sum([1, 2]) == 3")[0]
    ok, err = ev.run_python("assert 1 == 2, 'wrong'")
    assert not ok and "AssertionError: wrong" in err
    assert ev.run_python("while True: pass", timeout=1.0) == (False, "timeout")


def test_run_python_has_no_network_an_empty_env_and_a_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    program = (
        "import os, socket\n"
        "assert 'HTTPS_PROXY' not in os.environ\n"
        "assert os.getcwd().split(os.sep)[-1].startswith('gptkit-exec-'), os.getcwd()\n"
        "open('scratch.txt', 'w').write('x')\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "    raise SystemExit('network reachable')\n"
        "except OSError:\n"
        "    pass\n"
    )
    ok, err = ev.run_python(program)
    assert ok, err


# ---------------------------------------------------------------------------- model-based
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("eval") / "base", block_size=16)


def test_perplexity_and_bpb_match_a_plain_forward(ckpt):
    model = open_checkpoint(ckpt).model
    tok = open_tokenizer(ckpt)
    text = "the quick brown fox jumps over the lazy dog, twice over"  # longer than one 16-token window
    got = ev.perplexity(model, tok, text)
    ids = torch.tensor(tok.encode(text))
    nll = sum(torch.nn.functional.cross_entropy(model(ids[s:s + 17][None, :-1])[0], ids[s + 1:s + 17],
                                                reduction="sum").item() for s in range(0, len(ids) - 1, 16))
    assert got["tokens"] == len(ids) - 1
    assert got["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-6)
    assert got["bpb"] == pytest.approx(nll / math.log(2) / (len(text.encode()) - 1), rel=1e-5)  # 1 byte per char


def test_evaluate_command_prints_a_table_and_writes_json(tmp_path, ckpt):
    data = write_jsonl(tmp_path / "qa.jsonl", QA[:5])
    out = tmp_path / "qa.json"
    r = CliRunner().invoke(app, ["evaluate", ckpt, "--task", "qa", "--data", data, "--out", str(out),
                                 "--max-tokens", "4"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["n"] == 5 and 0 <= result["exact_match"] <= result["token_f1"] <= 1
    assert "exact_match" in r.output and "token_f1" in r.output
    r = CliRunner().invoke(app, ["evaluate", ckpt, "--task", "classify", "--data", data])
    assert r.exit_code == 2 and "no classification head" in r.output


def test_classify_and_summarize_tasks_score_what_the_model_predicts(tmp_path, ckpt, monkeypatch):
    from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune

    out = tmp_path / "cls"
    finetune(ckpt, [DataSpec(write_jsonl(tmp_path / "c.jsonl", CLS))], train_cfg(out, max_steps=2),
             FinetuneConfig(task="classify"), log=lambda m: None)
    data = write_jsonl(tmp_path / "test.jsonl", CLS[:6])
    result = ev.evaluate(out, "classify", data)
    model, cfg = (loaded := open_checkpoint(out)).model, loaded.meta
    preds = ev.classify(model, open_tokenizer(out), [r["text"] for r in CLS[:6]], cfg.extra["labels"])
    assert result["accuracy"] == ev.accuracy_f1(preds, [r["label"] for r in CLS[:6]])["accuracy"]
    monkeypatch.setattr(ev, "generate_all", lambda model, tok, prompts, *a, **k: ["the cat sat"] * len(prompts))
    summ = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "x", "completion": "the cat sat down"}])
    assert ev.evaluate(ckpt, "summarize", summ)["rouge_l"] == pytest.approx(ev.rouge_l("the cat sat", "the cat sat down"))


def test_code_task_runs_each_completion_against_its_tests(tmp_path, ckpt, monkeypatch):
    records = [{"prompt": "def add(a, b):\n", "tests": "assert add(2, 3) == 5"},
               {"prompt": "def sub(a, b):\n", "tests": "assert sub(2, 3) == -1"}]
    completions = ["    return a + b\n", "    return a + b\n"]  # the second is wrong
    monkeypatch.setattr(ev, "generate_all", lambda *a, **k: completions)
    result = ev.evaluate(ckpt, "code", write_jsonl(tmp_path / "code.jsonl", records))
    assert result["pass@1"] == 0.5 and [e["passed"] for e in result["examples"]] == [True, False]
