"""`gptkit pretrain` end to end on a prepared corpus: 1 process vs 2 DDP processes, resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gptkit.cli import app
from gptkit.checkpoint.open import open_checkpoint
from gptkit.config import FinetuneTrainConfig, ModelConfig, TrainConfig
from gptkit.data.prepare import prepare
from gptkit.text.tokenizer import BPETokenizer

ARGS = ["--preset", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
        "--max-steps", "12", "--lr", "3e-3", "--warmup-steps", "2", "--eval-interval", "6", "--eval-batches", "2", "--log-interval", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_text):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(sample_text * 3, encoding="utf-8")
    (root / "b.txt").write_text(sample_text[::-1] * 3, encoding="utf-8")
    tok = BPETokenizer.train([sample_text], vocab_size=300)
    tok.save(root / "tok")
    prepare([str(root / "a.txt"), str(root / "b.txt")], root / "tok", root / "data", val_fraction=0.1)
    return root / "data"


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def _losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_ddp_processes_match_one_process(tmp_path, data_dir):
    single = _run([sys.executable, "-m", "gptkit", "pretrain", str(data_dir), "--out", str(tmp_path / "one"),
                   "--batch-size", "8", *ARGS])
    assert single.returncode == 0, single.stderr
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                "-m", "gptkit", "pretrain", str(data_dir), "--out", str(tmp_path / "two"), "--batch-size", "4", *ARGS])
    assert ddp.returncode == 0, ddp.stderr
    assert "2 process(es)" in ddp.stderr
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 13))
    for (s1, l1), (s2, l2) in zip(one, two):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5), (s1, l1, l2)
    assert one[-1][1] < one[0][1]  # it learned something, so the comparison is not of two constants


def test_pretrain_cli_resume_and_errors(tmp_path, data_dir):
    out = tmp_path / "run"
    first = _run([sys.executable, "-m", "gptkit", "pretrain", str(data_dir), "--out", str(out), "--batch-size", "4",
                  "--stop-at", "7", *ARGS])
    assert first.returncode == 0, first.stderr
    resumed = _run([sys.executable, "-m", "gptkit", "pretrain", str(data_dir), "--out", str(out), "--batch-size", "4",
                    "--resume", *ARGS])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "done: step 12" in resumed.stdout
    again = _run([sys.executable, "-m", "gptkit", "pretrain", str(data_dir), "--out", str(out), "--batch-size", "4",
                  "--resume", *ARGS])  # a finished run: nothing to train, and its real last metrics
    assert again.returncode == 0, again.stderr
    assert "the run is at step 12 of --max-steps 12: nothing to train" in again.stderr
    last_loss = resumed.stdout.split("loss ")[1].split()[0]
    assert again.stdout.startswith(f"done: step 12 loss {last_loss}") and "nan" not in again.stdout
    # options that contradict the run are refused in one line; leaving them out resumes it
    more = ["--max-steps", "14", "--batch-size", "4", "--eval-interval", "7"]
    wider = _run([sys.executable, "-m", "gptkit", "pretrain", str(data_dir), "--out", str(out), "--resume",
                  "--n-embd", "48", "--n-head", "2", *more])
    assert wider.returncode == 2 and wider.stderr.strip().splitlines() == [
        f"error: --resume: the run in {out} has block_size=32, not 256; n_layer=2, not 4; n_embd=32, not 48; "
        "leave --preset and the model options out to resume it, or start a new run (--init-from to begin from "
        "its weights)"], wider.stderr
    other = tmp_path / "other"
    prepare([str(data_dir.parent / "a.txt")], data_dir.parent / "tok", other, val_fraction=0.1)
    moved = _run([sys.executable, "-m", "gptkit", "pretrain", str(other), "--out", str(out), "--resume", *more])
    assert moved.returncode == 2 and "--resume: the run was trained on" in moved.stderr and str(other) in moved.stderr
    longer = _run([sys.executable, "-m", "gptkit", "pretrain", str(data_dir), "--out", str(out), "--resume", *more])
    assert longer.returncode == 0 and "done: step 14" in longer.stdout, longer.stderr
    missing = _run([sys.executable, "-m", "gptkit", "pretrain", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no meta.json; "
                                                   "create the folder with `gptkit prepare`"]


@pytest.mark.parametrize("command, cls", [("pretrain", TrainConfig), ("finetune", FinetuneTrainConfig),
                                          ("pretrain", ModelConfig)])
def test_every_training_option_is_reachable_from_the_cli(command, cls):
    """The options are generated from the config's fields: each one is in --help, with its help text
    (the model's vocabulary comes from the data's tokenizer)."""
    text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).output
    flags = {"out_dir": "--out"}
    for f in dataclasses.fields(cls):
        if f.name == "vocab_size":
            continue
        assert flags.get(f.name, "--" + f.name.replace("_", "-")) in text, f.name
        assert f.metadata["help"].split(";")[0][:40] in " ".join(text.split()), f.name


def test_pretrain_a_modern_decoder_from_the_cli(tmp_path, data_dir):
    """The model options change the preset: rotary positions, RMSNorm, SwiGLU, one KV head, QK-norm,
    an untied head; the checkpoint records them and continues a prompt."""
    out = tmp_path / "modern"
    r = CliRunner().invoke(app, ["pretrain", str(data_dir), "--out", str(out), "--batch-size", "4", *ARGS,
                                 "--pos-encoding", "rope", "--norm", "rmsnorm", "--activation", "swiglu",
                                 "--n-kv-head", "1", "--qk-norm", "--no-tie-embeddings", "--no-bias"])
    assert r.exit_code == 0, r.output
    cfg = open_checkpoint(out).meta.model
    assert (cfg.pos_encoding, cfg.norm, cfg.activation, cfg.n_kv_head, cfg.qk_norm, cfg.tie_embeddings, cfg.bias,
            cfg.n_layer, cfg.n_embd) == ("rope", "rmsnorm", "swiglu", 1, True, False, False, 2, 32)
    losses = _losses(out)
    assert losses[-1][1] < losses[0][1]
    gen = CliRunner().invoke(app, ["generate", str(out), "-p", "the", "--max-tokens", "5", "--temperature", "0"])
    assert gen.exit_code == 0 and gen.output.startswith("the"), gen.output
    bad = CliRunner().invoke(app, ["pretrain", str(data_dir), "--out", str(tmp_path / "bad"), "--n-kv-head", "3"])
    assert bad.exit_code == 2 and "n_kv_head=3 must divide n_head=4" in bad.output
