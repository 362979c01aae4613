"""`gptkit compare`: its numbers agree with `gptkit evaluate`, a model compared with itself shows
zero differences, a prepared folder is decoded (or refused when its tokenizer is foreign), and
the report files exist and parse."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gptkit.evaluation.evaluate as ev
from gptkit.checkpoint.rundir import resolve_checkpoint
from gptkit.evaluation.bootstrap import paired
from gptkit.cli import app
from gptkit.evaluation.compare import CompareConfig, compare
from gptkit.errors import GptkitError
from gptkit.data.prepare import prepare
from gptkit.text.tokenizer import CharTokenizer
from test_finetune import QA, make_base, write_jsonl

TEXT = "what is 1+2? 3. what is 2+2? 4.\nthe quick brown fox jumps over the lazy dog.\n" * 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    a = make_base(tmp / "a", seed=0, block_size=32)
    b = make_base(tmp / "b", seed=1, block_size=32)
    (tmp / "text.txt").write_text(TEXT)
    tasks = write_jsonl(tmp / "qa.jsonl", QA[:8])
    (tmp / "prompts.txt").write_text("what is 1+1? \nthe quick\n")
    return tmp, a, b, tasks


class _Html(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]


def test_self_comparison_has_zero_differences_and_agrees_with_evaluate(setup):
    tmp, a, _, tasks = setup
    out = tmp / "self"
    s = compare([a, a], CompareConfig(data=tmp / "text.txt", tasks=Path(tasks), prompts=tmp / "prompts.txt", out=out,
                                      max_tokens=4, answer_tokens=6, bootstrap=200, speed_rounds=1))
    first, second = s["models"]
    assert second["label"] == "a#2"
    for metric, d in second["diff"].items():
        assert d["value"] == 0 and d["lo"] <= 0 <= d["hi"], metric
    assert first["answers"] == second["answers"]  # greedy and seeded samples alike
    ppl = ev.evaluate(a, "perplexity", tmp / "text.txt")
    assert first["text"]["bpb"] == pytest.approx(ppl["bpb"], rel=1e-6)
    assert first["text"]["loss"] == pytest.approx(ppl["loss"], rel=1e-6)
    qa = ev.evaluate(a, "qa", tasks, max_tokens=4)
    for metric in ("exact_match", "token_f1"):
        e = first["task"][metric]
        assert e["value"] == pytest.approx(qa[metric]) and e["lo"] <= e["value"] <= e["hi"]
    assert first["size"]["params"] > 0 and first["speed"]["decode_tokens_per_s"] > 0

    # the report: files exist and parse, the HTML needs nothing from outside
    assert json.loads((out / "results.json").read_text())["models"][0]["label"] == "a"
    page = (out / "index.html").read_text()
    parser = _Html()
    parser.feed(page)
    assert "table" in parser.tags and parser.srcs and all(src.startswith("data:image/png;base64,") for src in parser.srcs)
    assert "<script" not in page
    md = (out / "report.md").read_text()
    assert "| model | bits/byte |" in md and "a#2 − a" in md
    assert "One round only: no measure of this machine's noise" in md  # speed_rounds=1
    assert len(first["speed"]["decode_tokens_per_s_by_round"]) == 1
    for png in ("speed.png", "bpb.png", "task.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    # every example's answers are saved; a model against itself never disagrees
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["where"].endswith("qa.jsonl:1") and set(rows[0]["answers"]) == {"a", "a#2"}
    assert rows[0]["reference"] == QA[0]["completion"] and s["disagreements"] == []


def test_different_models_prepared_data_and_int8_through_the_cli(setup):
    tmp, a, b, _ = setup
    data = tmp / "prepared"
    prepare([str(tmp / "text.txt")], resolve_checkpoint(a), data, val_fraction=0.5, warn=lambda m: None)
    out = tmp / "cli"
    r = CliRunner().invoke(app, ["compare", a, b, f"a8={a}@int8", "--data", str(data), "--out", str(out)])
    assert r.exit_code == 0, r.output
    last = json.loads(r.output.strip().splitlines()[-1])
    assert set(last) == {"a", "b", "a8"}
    decoded = out / "data.txt"
    assert decoded.is_file() and len(decoded.read_bytes()) == json.loads((data / "meta.json").read_text())["text_bytes"]["val"]
    for ckpt, label in ((a, "a"), (b, "b")):  # the same numbers as `gptkit evaluate` on the decoded text
        assert last[label]["bpb"] == pytest.approx(ev.evaluate(ckpt, "perplexity", decoded)["bpb"], rel=1e-6)
    assert last["a8"]["bpb"] != last["a"]["bpb"] and last["a8"]["bpb"] == pytest.approx(last["a"]["bpb"], rel=0.05)
    assert "(best)" in r.output
    assert re.search(r"Noise: one model's speed moved by up to \d+% between rounds", (out / "report.md").read_text())


def test_a_prepared_folder_of_a_foreign_tokenizer_is_refused(setup, tmp_path):
    tmp, a, _, _ = setup
    tok = CharTokenizer(list("xyz"))
    tok.save(tmp_path / "tok")
    (tmp_path / "t.txt").write_text("xyzzy " * 50)
    prepare([str(tmp_path / "t.txt")], tmp_path / "tok", tmp_path / "prep", val_fraction=0.5, warn=lambda m: None)
    with pytest.raises(GptkitError, match="pass the raw text file"):
        compare([a], CompareConfig(data=tmp_path / "prep", out=tmp_path / "out", speed_rounds=1))
    r = CliRunner().invoke(app, ["compare", a, "--tasks", str(tmp_path / "t.txt")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_paired_bootstrap_intervals_separate_a_real_gap_from_noise():
    better = [1.0] * 45 + [0.0] * 5
    worse = [1.0] * 10 + [0.0] * 40
    values, diffs = paired(lambda m, idx: {"acc": sum((better, worse)[m][i] for i in idx) / len(idx)}, 2, 50, 500)
    assert values[0]["acc"]["value"] == 0.9 and diffs[1]["acc"]["value"] == pytest.approx(-0.7)
    assert diffs[1]["acc"]["hi"] < 0  # a real gap: the interval excludes 0
    noisy = [1.0, 0.0] * 25
    _, diffs = paired(lambda m, idx: {"acc": sum((noisy, noisy[::-1])[m][i] for i in idx) / len(idx)}, 2, 50, 500)
    assert diffs[1]["acc"]["lo"] < 0 < diffs[1]["acc"]["hi"]


def test_chat_tasks_prompt_a_model_without_chat_tokens_like_the_others(setup, tmp_path):
    from test_finetune import CHAT

    tmp, a, _, _ = setup
    plain = make_base(tmp_path / "plain", specials=["<|endoftext|>"], block_size=32)
    tasks = Path(write_jsonl(tmp_path / "chat.jsonl", CHAT[:4]))
    s = compare([plain, a], CompareConfig(tasks=tasks, task="summarize", out=tmp_path / "r", max_tokens=3,
                                          bootstrap=50, speed_rounds=1))
    first, second = s["models"]
    assert "rouge_l" in first["task"] and "no chat template" in first["notes"][0] and not second["notes"]
    assert "no chat template" in (tmp_path / "r" / "report.md").read_text()


def test_translation_into_chinese_is_scored_with_the_zh_tokenizer_and_says_so(setup):
    tmp, a, b, _ = setup
    pairs = [{"prompt": f"what is {i}? ", "completion": f"我有{i}个梦想。"} for i in range(6)]
    tasks = write_jsonl(tmp / "zh.jsonl", pairs)
    out = tmp / "zh"
    s = compare([a, b], CompareConfig(data=tmp / "text.txt", tasks=Path(tasks), task="translate", out=out,
                                      max_tokens=4, answer_tokens=4, bootstrap=50, speed_rounds=1))
    assert s["task"] == "translate" and s["bleu_tokenize"] == "zh"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[2]["reference"] == "我有2个梦想。" and set(rows[2]["answers"]) == {"a", "b"}
    differ = [r for r in rows if r["answers"]["a"] != r["answers"]["b"]]
    assert s["disagreements"] == differ[:10]  # two different random models: they differ somewhere
    assert differ and "## Examples where the answers differ" in (out / "report.md").read_text()
    assert "sacrebleu's `zh` tokenizer" in (out / "report.md").read_text()
    assert ev.evaluate(a, "translate", tasks)["bleu_tokenize"] == "zh"
