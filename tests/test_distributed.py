"""Fine-tuning under torchrun, and FSDP2 for pretraining and fine-tuning: 2 CPU processes (gloo)
against 1 process with the same global batch, and exact resume of a sharded run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gptkit.checkpoint.rundir import resolve_checkpoint
from gptkit.checkpoint.format import WEIGHTS

from test_finetune import make_base, write_jsonl
from test_pretrain_cli import ARGS, _losses, _run, data_dir  # noqa: F401 (data_dir is a fixture)

# completions of different lengths, so the two processes' slices hold different numbers of target tokens
QA = [{"prompt": f"q{i} what? ", "completion": "ab" * (1 + i % 5) + f" {i}"} for i in range(20)]
CLS = [{"text": f"{w} {i}", "label": w[:3]} for i in range(6) for w in ("apple pie", "zebra run")]
PAIRS = [{"prompt": f"q{i} what? ", "chosen": "ab" * (1 + i % 3), "rejected": f"no {i}"} for i in range(20)]
FT = ["--max-steps", "6", "--lr", "3e-3", "--warmup-steps", "1", "--eval-interval", "3", "--eval-batches", "4",
      "--val-fraction", "0.25", "--log-interval", "1"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    # --standalone: the rendezvous takes a free port, so concurrent test runs never collide
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "gptkit", *args])


def gptkit(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "gptkit", *args])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path) -> None:
    """Every logged train and validation loss agrees within float tolerance."""
    a, b = _metrics(one), _metrics(two)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if "loss" in key:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key, ra[key], rb[key])
    train = [r["loss"] for r in a if "loss" in r]
    assert train[-1] < train[0]  # it learned something, so the comparison is not of two constants


def assert_same_weights(one: Path, two: Path, exact: bool = False) -> None:
    wa, wb = (load_file(str(resolve_checkpoint(run) / WEIGHTS)) for run in (one, two))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        if exact:
            assert wa[k].equal(wb[k]), k
        else:
            assert (wa[k] - wb[k]).abs().max().item() < 1e-4, k


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("method,mixture", [([], False), (["--lora-rank", "4"], False), ([], True),
                                            (["--method", "dpo", "--optimizer", "adamw"], False)],
                         ids=["full", "lora", "lm+classify-mixture", "dpo"])
def test_finetune_two_processes_match_one_process(tmp_path, base, method, mixture):
    data = [write_jsonl(tmp_path / "qa.jsonl", PAIRS if "dpo" in method else QA)]
    if mixture:  # the classification head sits out the LM batches: DDP must allow unused parameters
        data.append(write_jsonl(tmp_path / "cls.jsonl", CLS))
    single = gptkit("finetune", base, *data, "--out", str(tmp_path / "one"), "--batch-size", "4", *method, *FT)
    assert single.returncode == 0, single.stderr
    two = torchrun("finetune", base, *data, "--out", str(tmp_path / "two"), "--batch-size", "2", *method, *FT)
    assert two.returncode == 0, two.stderr
    assert [line for line in two.stderr.splitlines() if line.startswith("model: ")] == [
        next(line for line in two.stderr.splitlines() if line.startswith("model: "))]  # said once, by rank 0
    optimizer = "adamw" if method else "muon"  # LoRA adapters are AdamW's, whatever --optimizer says
    assert f"2 process(es) on cpu, ddp, {optimizer}" in two.stderr and f"1 process(es) on cpu, {optimizer}" in single.stderr
    assert two.stdout.count("done: step 6") == 1
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert_same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_fsdp_pretraining_matches_one_process_and_resumes_exactly(tmp_path, data_dir):  # noqa: F811
    # the optimizer FSDP's default resolves to (Muon needs whole matrices), so both runs use AdamW
    one = gptkit("pretrain", str(data_dir), "--out", str(tmp_path / "one"), "--batch-size", "8", "--optimizer",
                 "adamw", *ARGS)
    assert one.returncode == 0, one.stderr
    fsdp = ["--strategy", "fsdp", "--batch-size", "4", *ARGS]
    full = torchrun("pretrain", str(data_dir), "--out", str(tmp_path / "fsdp"), *fsdp)
    assert full.returncode == 0, full.stderr
    assert "2 process(es) on cpu, fsdp, adamw" in full.stderr
    assert_same_run(tmp_path / "one", tmp_path / "fsdp")
    assert_same_weights(tmp_path / "one", tmp_path / "fsdp")  # one consolidated file, as one process writes

    first = torchrun("pretrain", str(data_dir), "--out", str(tmp_path / "resumed"), "--stop-at", "7", *fsdp)
    assert first.returncode == 0, first.stderr
    resumed = torchrun("pretrain", str(data_dir), "--out", str(tmp_path / "resumed"), "--resume", *fsdp)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("resumed from") == 1  # said by rank 0 alone
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "fsdp")  # bit for bit
    assert_same_weights(tmp_path / "fsdp", tmp_path / "resumed", exact=True)
    generated = gptkit("generate", str(tmp_path / "resumed"), "-p", "def", "--max-tokens", "4")
    assert generated.returncode == 0, generated.stderr  # every command reads the gathered checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classify", "dpo"])
def test_fsdp_lora_with_activation_checkpointing_matches_one_process(tmp_path, base, kind):
    data = write_jsonl(tmp_path / "data.jsonl", CLS if kind == "classify" else PAIRS)
    args = [base, data, "--lora-rank", "4", *FT, *(["--method", "dpo"] if kind == "dpo" else [])]
    one = gptkit("finetune", *args, "--out", str(tmp_path / "one"), "--batch-size", "4")
    assert one.returncode == 0, one.stderr
    two = torchrun("finetune", *args, "--out", str(tmp_path / "two"), "--batch-size", "2", "--strategy", "fsdp",
                   "--activation-checkpointing")
    assert two.returncode == 0, two.stderr
    assert "2 process(es) on cpu, fsdp" in two.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_muon_with_fsdp_is_refused_in_one_line(tmp_path, data_dir):  # noqa: F811
    r = gptkit("pretrain", str(data_dir), "--out", str(tmp_path / "x"), "--strategy", "fsdp", "--optimizer", "muon")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --optimizer muon does not run with --strategy fsdp (Muon "
                                             "orthogonalizes whole matrices, FSDP shards them); use --strategy ddp "
                                             "or --optimizer adamw"]


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_runs_on_cpu(tmp_path, data_dir):  # noqa: F811
    """bf16 weights gathered and computed, fp32 gradients reduced, fp32 weights saved."""
    out = tmp_path / "bf16"
    r = torchrun("pretrain", str(data_dir), "--out", str(out), "--strategy", "fsdp", "--dtype", "bfloat16",
                 "--activation-checkpointing", "--batch-size", "4", *ARGS, "--max-steps", "4")
    assert r.returncode == 0, r.stderr
    losses = [loss for _, loss in _losses(out)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert {str(t.dtype) for t in load_file(str(resolve_checkpoint(out) / WEIGHTS)).values()} == {"torch.float32"}


def test_info_prints_memory_per_device_for_ddp_and_fsdp():
    r = gptkit("info", "--preset", "gpt2-xl", "--world-size", "8", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    n, mem = stats["params"], stats["per_device"]
    assert mem["ddp"]["total"] == 16 * n  # fp32 weights 4 + grads 4 + AdamW moments 8 bytes per parameter
    assert mem["fsdp"]["total"] - mem["fsdp"]["gathered"] == pytest.approx(16 * n / 8, abs=8)
    assert 0 < mem["fsdp"]["gathered"] < 4 * n / 8  # the embeddings and two of the 48 blocks, in fp32
    text = gptkit("info", "--preset", "gpt2-xl", "--world-size", "8").stdout
    assert "ddp     23.21 GiB" in text and "fsdp     3.44 GiB" in text
