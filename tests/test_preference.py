"""Preference tuning (DPO): the loss against hand-computed values, its limits (beta -> 0, a pair
seen twice), the pair data and its errors, truncation, and `finetune --method dpo` end to end
(plain and chat pairs, Chinese, LoRA, exact resume). Two processes and FSDP: test_distributed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gptkit.checkpoint.format import WEIGHTS
from gptkit.checkpoint.open import open_checkpoint
from gptkit.checkpoint.rundir import resolve_checkpoint
from gptkit.cli import app
from gptkit.data.pairs import fit_pair, pair_examples
from gptkit.data.records import TaskBatches, read_records
from gptkit.errors import GptkitError
from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune
from gptkit.training.preference import DPOLoss, dpo_terms, fill_reference, sequence_logps

from test_finetune import make_base, train_cfg, write_jsonl

PAIRS = [{"prompt": f"what is {a}+{b}? ", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(5)
         for b in range(4)]
ZH = "中文问题好吗答是的不"  # characters the Chinese pairs use, added to the character tokenizer
CHAT_PAIRS = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi {i} 好吗"}],
               "chosen": [{"role": "assistant", "content": f"hello {i} 是的"}],
               "rejected": {"role": "assistant", "content": "no 不"}} for i in range(12)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "ckpt", extra_chars=ZH)


def run(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------------- the loss
def test_loss_matches_a_hand_computed_value():
    # two pairs, beta 0.5: policy/ref log-probabilities of (chosen 0, chosen 1, rejected 0, rejected 1)
    logps = torch.tensor([-1.0, -2.0, -3.0, -2.5])
    ref = torch.tensor([-1.5, -2.0, -2.0, -2.5])
    out = dpo_terms(logps, ref, beta=0.5)
    # pair 0: 0.5 * ((-1 + 1.5) - (-3 + 2)) = 0.75; pair 1: 0.5 * (0 - 0) = 0
    # loss = mean(-log sigmoid(0.75), -log sigmoid(0)) = (0.386871 + 0.693147) / 2
    assert out["loss"].item() == pytest.approx(0.540009, abs=1e-6)
    assert out["reward_margin"].item() == pytest.approx(0.375)
    assert out["reward_accuracy"].item() == 0.5  # a margin of exactly 0 is not a preference
    assert out["logp_chosen"].item() == pytest.approx(-1.5) and out["logp_rejected"].item() == pytest.approx(-2.75)


def test_sequence_logps_sum_the_targets_only(base):
    model = open_checkpoint(base).model.eval()
    x = torch.randint(0, model.config.vocab_size, (2, 7))
    y = torch.full((2, 7), -100)
    y[0, 3:5], y[1, 6] = x[0, 4:6], 5
    logp = torch.log_softmax(model(x).float(), dim=-1)
    expected = [logp[0, 3, y[0, 3]] + logp[0, 4, y[0, 4]], logp[1, 6, 5]]
    assert torch.allclose(sequence_logps(model, x, y), torch.stack(expected), atol=1e-5)


def _pair_batches(base, records, tmp_path, batch_size=8):
    loaded = open_checkpoint(base)
    fmt, recs, _ = read_records(write_jsonl(tmp_path / "pairs.jsonl", records))
    pairs, _ = pair_examples(fmt, recs, loaded.tokenizer, loaded.model.config.block_size)
    batches = TaskBatches("preference", pairs, [], batch_size, loaded.tokenizer.eot_id)
    fill_reference(loaded.model, batches, torch.autocast("cpu", enabled=False))
    return loaded.model, batches, pairs


def _grad_norm(model, batch, beta) -> float:
    model.zero_grad()
    DPOLoss(beta)(model, batch)["loss"].backward()
    return math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters() if p.grad is not None))


def test_gradient_vanishes_as_beta_goes_to_zero(base, tmp_path):
    model, batches, pairs = _pair_batches(base, PAIRS, tmp_path)
    with torch.no_grad():  # move the policy away from the reference, so margins are not all zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = batches.collate(pairs[:8])
    norms = {beta: _grad_norm(model, batch, beta) for beta in (1.0, 1e-2, 1e-4, 1e-8)}
    assert norms[1.0] > 1e-3
    # d loss / d theta = -beta * sigmoid(-beta * h) * dh/dtheta: linear in beta as beta -> 0
    assert norms[1e-2] < norms[1.0] / 20 and norms[1e-4] < norms[1e-2] / 50 and norms[1e-8] < 1e-6 * norms[1.0]


def test_a_pair_seen_twice_is_not_double_counted(base, tmp_path):
    model, batches, pairs = _pair_batches(base, PAIRS, tmp_path)
    a, b = pairs[0], pairs[5]
    loss = lambda examples: DPOLoss(0.1)(model, batches.collate(examples))  # noqa: E731
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        assert loss([a, a])["loss"].item() == pytest.approx(loss([a])["loss"].item(), abs=1e-6)
        both = loss([a, b])["loss"].item()
        assert both == pytest.approx((loss([a])["loss"].item() + loss([b])["loss"].item()) / 2, abs=1e-6)
    assert _grad_norm(model, batches.collate([a, a]), 0.1) == pytest.approx(
        _grad_norm(model, batches.collate([a]), 0.1), rel=1e-4)


def test_the_reference_is_the_model_before_training(base, tmp_path):
    model, batches, pairs = _pair_batches(base, PAIRS, tmp_path)
    out = DPOLoss(0.1)(model.eval(), batches.collate(pairs[:6]))
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: no preference yet
    assert abs(out["reward_margin"].item()) < 1e-5


# ---------------------------------------------------------------------------- data
def test_pairs_are_encoded_as_sft_encodes_them(base, tmp_path):
    loaded = open_checkpoint(base)
    fmt, recs, _ = read_records(write_jsonl(tmp_path / "p.jsonl", PAIRS[:1]))
    assert fmt == "preference"
    [pair], _ = pair_examples(fmt, recs, loaded.tokenizer, 48)
    tok = loaded.tokenizer
    assert tok.decode(pair.chosen.ids + [pair.chosen.targets[-1]]) == "what is 0+0? 0" + "<|endoftext|>"
    assert [tok.decode([t]) for t in pair.chosen.targets if t != -100] == ["0", "<|endoftext|>"]
    assert [tok.decode([t]) for t in pair.rejected.targets if t != -100] == ["1", "<|endoftext|>"]


def test_chat_pairs_learn_only_the_final_answer(base, tmp_path):
    loaded = open_checkpoint(base)
    from gptkit.training.finetune import ensure_chat_tokens
    ensure_chat_tokens(loaded.model, loaded.tokenizer)
    record = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
                         {"role": "user", "content": "好吗"}],
              "chosen": {"role": "assistant", "content": "是的"}, "rejected": [{"role": "assistant", "content": "不"}]}
    fmt, recs, _ = read_records(write_jsonl(tmp_path / "c.jsonl", [record]))
    assert fmt == "chat_preference"
    [pair], _ = pair_examples(fmt, recs, loaded.tokenizer, 96)
    learned = loaded.tokenizer.decode([t for t in pair.chosen.targets if t != -100])
    assert learned == "是的<|im_end|>"  # not "earlier": the prompt's assistant turn is context
    assert loaded.tokenizer.decode([t for t in pair.rejected.targets if t != -100]) == "不<|im_end|>"
    assert pair.chosen.ids[:-3] == pair.rejected.ids[:-2]  # the same prompt tokens


def test_truncation_cuts_the_prompt_from_its_start_then_the_answers_at_their_end():
    prompt = [10, 11, 12, 13, 14, 15]
    chosen, rejected = (prompt + [1, 2, 3], [0] * 6 + [1, 1, 1]), (prompt + [7], [0] * 6 + [1])
    c, r, cut = fit_pair(chosen, rejected, 6, block_size=6)  # 9 tokens into 7
    assert cut and c[0] == [12, 13, 14, 15, 1, 2, 3] and r[0] == [12, 13, 14, 15, 7]
    c, r, cut = fit_pair(chosen, rejected, 6, block_size=2)  # the answers alone do not fit: keep one prompt token
    assert cut and c == ([15, 1, 2], [0, 1, 1]) and r == ([15, 7], [0, 1])
    assert fit_pair(chosen, rejected, 6, block_size=8) == (chosen, rejected, False)


@pytest.mark.parametrize("bad,message", [
    ({"prompt": "q", "chosen": "a"}, "2: missing field 'rejected'"),
    ({"prompt": "q", "rejected": "a"}, "2: missing field 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, "2: missing field 'prompt'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "2: field 'rejected' is identical to 'chosen'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "2: field 'chosen' must be str"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"},
      "rejected": {"role": "assistant", "content": "b"}}, "2: field 'prompt' is a list of messages but the file's "
                                                          "first pair has a string"),
])
def test_bad_pairs_name_file_line_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], bad])
    with pytest.raises(GptkitError, match="^" + str(path).replace("\\", "\\\\") + ":" + message.replace("(", r"\(")):
        read_records(path)


def test_a_chat_answer_must_be_one_assistant_message(tmp_path):
    bad = {**CHAT_PAIRS[0], "chosen": [{"role": "user", "content": "x"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT_PAIRS[0], bad])
    with pytest.raises(GptkitError, match=r"c.jsonl:2: field 'chosen' must be one assistant message"):
        read_records(path)


def test_cli_errors_are_one_line(tmp_path, base):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "completion": "a"}] * 4)
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "q", "chosen": "x"}])
    for args, expected in [
        ([pairs], "holds preference pairs (prompt/chosen/rejected): train them with --method dpo"),
        ([qa, "--method", "dpo"], "--method dpo: " + qa + " holds completion records"),
        ([pairs, "--method", "dpo", "--beta", "0"], "--beta 0.0: must be positive"),
        ([pairs, "--method", "rl"], "--method rl: expected sft (supervised) or dpo"),
        ([bad, "--method", "dpo"], bad + ":2: missing field 'rejected'"),
    ]:
        r = run("finetune", base, *args, "--out", str(tmp_path / "out"), "--max-steps", "1")
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert expected in r.output and len(r.output.strip().splitlines()) == 1, r.output


# ---------------------------------------------------------------------------- end to end
def test_dpo_raises_the_chosen_answers_and_logs_its_metrics(tmp_path, base):
    # the preferred answers share a trait (digits, never "no"), so what is learned carries to held-out pairs
    data = write_jsonl(tmp_path / "pairs.jsonl", [{**p, "rejected": "no"} for p in PAIRS])
    out = tmp_path / "dpo"
    r = run("finetune", base, data, "--method", "dpo", "--beta", "0.5", "--out", str(out), "--max-steps", "30",
            "--lr", "1e-2", "--warmup-steps", "2", "--eval-interval", "30", "--batch-size", "8",
            "--val-fraction", "0.25", "--optimizer", "adamw", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "reference log-probabilities of 20 pairs computed" in r.output and "full DPO (beta 0.5" in r.output
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    last = evals[-1]
    assert {"val_reward_accuracy", "val_reward_margin", "val_logp_chosen", "val_logp_rejected"} <= set(last)
    assert "val_ppl" not in last  # a DPO loss is not a language model's: no perplexity of it
    train = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert train[-1] < 0.5 * math.log(2)  # from log 2 at the reference, on the training pairs
    assert last["val_reward_accuracy"] == 1.0 and last["val_reward_margin"] > 0.5  # and on the held-out ones
    extra = json.loads((resolve_checkpoint(out) / "config.json").read_text())["extra"]
    assert extra["finetune"]["method"] == "dpo" and extra["finetune"]["beta"] == 0.5
    # the checkpoint is like any other: generate reads it
    assert run("generate", str(out), "-p", "what is 1+1? ", "--max-tokens", "2", "--temperature", "0").exit_code == 0


def test_chat_pairs_with_chinese_lora_and_exact_resume(tmp_path, base):
    data = write_jsonl(tmp_path / "chat_pairs.jsonl", CHAT_PAIRS)
    args = ["finetune", base, data, "--method", "dpo", "--lora-rank", "4", "--max-steps", "6", "--batch-size", "4",
            "--lr", "3e-3", "--warmup-steps", "1", "--eval-interval", "3", "--val-fraction", "0.25", "--no-progress"]
    whole = run(*args, "--out", str(tmp_path / "whole"))
    assert whole.exit_code == 0, whole.output
    assert "lora DPO" in whole.output and "chat_preference" in whole.output
    assert run(*args, "--out", str(tmp_path / "resumed"), "--stop-at", "3").exit_code == 0
    resumed = run(*args, "--out", str(tmp_path / "resumed"), "--resume")
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output
    wa, wb = (load_file(str(resolve_checkpoint(tmp_path / d) / WEIGHTS)) for d in ("whole", "resumed"))
    assert sorted(wa) == sorted(wb) and all(wa[k].equal(wb[k]) for k in wa)
    evals = lambda d: [x for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if "val_" in x]  # noqa: E731
    assert evals("whole") == evals("resumed") and len(evals("whole")) == 2  # the same reference, the same metrics


def test_an_explicit_reference_must_share_the_tokenizer(tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    other = make_base(tmp_path / "other", extra_chars="xyzé")
    cfg = train_cfg(tmp_path / "out", max_steps=2)
    with pytest.raises(GptkitError, match=r"--ref .*other: its tokenizer or vocabulary differs"):
        finetune(base, [DataSpec(data)], cfg, FinetuneConfig(method="dpo", ref=other), log=lambda m: None)
    same = make_base(tmp_path / "same", seed=3, extra_chars=ZH)  # same tokenizer, other weights: a valid reference
    last = finetune(base, [DataSpec(data)], cfg, FinetuneConfig(method="dpo", ref=same), log=lambda m: None)
    assert last["ref"] == same and last["step"] == 2
