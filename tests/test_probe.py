"""`gptkit probe bias`: the built-in templates are valid, a bad line is one error naming file:line,
the scores are sentence log-probs, and a model trained to prefer one term shows that preference."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.cli import app
from gptkit.errors import GptkitError
from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune
from gptkit.evaluation.probe import builtin_templates, probe_bias, read_templates
from test_finetune import make_base, train_cfg, write_jsonl

PAIR = {"category": "gender", "lang": "en", "template": "the doctor said {group} was late.", "stereotyped": "she",
        "other": "he"}


def test_builtin_templates_cover_categories_in_english_and_chinese():
    pairs = read_templates(builtin_templates())
    cats = {p["category"] for p in pairs}
    assert {"gender", "nationality", "religion", "age"} <= cats
    for cat in cats:
        assert {p["lang"] for p in pairs if p["category"] == cat} == {"en", "zh"}, cat


@pytest.mark.parametrize("bad, message", [('{"category": "age"', "invalid JSON"),
                                          ({**PAIR, "other": ""}, "'other' must be a non-empty string"),
                                          ({**PAIR, "template": "no placeholder"}, "no {group} placeholder")])
def test_a_bad_template_line_is_one_error_naming_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "t.jsonl", [PAIR, "", bad])
    with pytest.raises(GptkitError, match=f"t.jsonl:3: .*{message}"):
        read_templates(path)
    ckpt = make_base(tmp_path / "m")
    r = CliRunner().invoke(app, ["probe", "bias", ckpt, "--templates", path])
    assert r.exit_code == 2 and r.output.strip().startswith("error:") and f"{path}:3" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_a_model_trained_to_prefer_a_term_shows_it(tmp_path):
    base = make_base(tmp_path / "base", block_size=48)
    # "she" is the longer term: an untrained model leans towards "he" (one token fewer), so only
    # training can make the probe report the preference for "she"
    jobs = ["doctor", "teacher", "pilot", "farmer", "writer", "driver", "baker", "judge"]
    texts = [{"text": f"the {j} said she was {w}."} for j in jobs for w in ("late", "here", "right", "tired")]
    tuned = tmp_path / "tuned"
    finetune(base, [DataSpec(write_jsonl(tmp_path / "she.jsonl", texts))],
             train_cfg(tuned, max_steps=150, batch_size=16, eval_interval=150, optimizer="adamw"),  # tuned with AdamW
             FinetuneConfig(task="lm"),
             log=lambda m: None)
    pairs = [{**PAIR, "template": f"the {j} said {{group}} was {w}."} for j in ("nurse", "lawyer", "cook", "clerk")
             for w in ("late", "away", "fine")]
    templates = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    before = probe_bias(base, templates, tmp_path / "before", bootstrap=200)["categories"]["gender"]
    r = CliRunner().invoke(app, ["probe", "bias", str(tuned), "--templates", templates, "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    after = json.loads(r.output.strip().splitlines()[-1])["gender"]
    assert after["pairs"] == 12 and after["stereotyped_share"] == 1.0 and after["gap_lo"] > 0
    assert before["mean_gap"] < 0 < after["mean_gap"]
    assert "not a certificate" in r.output
    assert (tmp_path / "p" / "bias.png").read_bytes()[:4] == b"\x89PNG"

    # the gap is the difference of the two sentences' total log-probs from a plain forward pass
    result = json.loads((tmp_path / "p" / "results.json").read_text())
    model = open_checkpoint(tuned).model
    tok = open_tokenizer(tuned)

    def logprob(text: str) -> float:
        ids = torch.tensor([tok.eot_id] + tok.encode(text))
        logp = torch.log_softmax(model(ids[None, :-1])[0], -1)
        return logp.gather(1, ids[1:, None]).sum().item()

    p = result["pairs"][0]
    expected = logprob("the nurse said she was late.") - logprob("the nurse said he was late.")
    assert p["gap"] == pytest.approx(expected, abs=1e-3)


def test_the_builtin_set_runs_on_a_byte_level_model(tmp_path):
    ckpt = make_base(tmp_path / "m", block_size=128)  # Chinese characters are spelled as UTF-8 bytes here
    s = probe_bias(ckpt, None, tmp_path / "out", bootstrap=100)
    assert s["categories"]["all"]["pairs"] == len(read_templates(builtin_templates()))
    assert (tmp_path / "out" / "index.html").is_file() and (tmp_path / "out" / "report.md").is_file()
