"""Crash safety: SIGKILL at many points (inside the save too), then --resume; damaged files.

The killed runs are forked children of the test process (torch already imported: a kill
cycle costs training time, not interpreter start-up), killed with a real SIGKILL.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.checkpoint.format import SAVE_PAUSE_ENV, load_train_state
from gptkit.checkpoint.rundir import LATEST, is_checkpoint, resolve_checkpoint, resume_candidate, set_verify_hashes
from gptkit.errors import GptkitError
from gptkit.config import ModelConfig, TrainConfig
from gptkit.data.shards import TokenShards
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import CharTokenizer
from gptkit.training.loop import train

import gptkit.training.history

STEPS, EVAL = 24, 4
TIMING = ("tokens_per_s", "elapsed_s")  # differ between runs by nature


def _setup(text: str, out: Path, resume: bool):
    tok = CharTokenizer.train([text])
    ids = np.array(tok.encode(text), dtype=np.uint16)
    n = int(0.9 * len(ids))
    data = TokenShards([ids[:n]], [ids[n:]], 32, 4, seed=5, eval_batches=2)
    cfg = TrainConfig(out_dir=str(out), max_steps=STEPS, batch_size=4, lr=3e-3, warmup_steps=4, eval_interval=EVAL,
                      eval_batches=2, log_interval=1, progress=False, keep=2)
    if resume:
        src = resume_candidate(out, lambda m: None)
        model = open_checkpoint(src).model.train()
        return model, data, cfg, tok, src
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    return model, data, cfg, tok, False


def _child(text: str, out: Path, resume: bool, pause: float) -> None:
    try:
        os.environ[SAVE_PAUSE_ENV] = str(pause)
        torch.set_num_threads(1)
        # loss.png is drawn after each save and is not under test here: at ~1 s a drawing on a
        # loaded 2-core machine it would be most of the test's time
        gptkit.training.history.plot = lambda history, path: None
        model, data, cfg, tok, src = _setup(text, out, resume)
        train(model, data, cfg, tok, resume=src, log=lambda m: None)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _start(text, out, resume, pause=0.0) -> multiprocessing.Process:
    p = multiprocessing.get_context("fork").Process(target=_child, args=(text, out, resume, pause))
    p.start()
    return p


def _metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _saving(out: Path, files: int) -> bool:
    """A save is under way with at least `files` entries written."""
    return any(len(list(t.iterdir())) >= files for t in out.glob(".step-*.tmp-*") if t.is_dir())


def _committed_not_pointed(out: Path) -> bool:
    """A step folder is complete but `latest` does not name it yet."""
    latest = (out / LATEST).read_text().strip() if (out / LATEST).is_file() else ""
    return any(p.name > latest for p in out.glob("step-*") if (p / "manifest.json").is_file())


def _history(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return open_checkpoint(out).model.state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_text):
    """An uninterrupted run, also in a forked child, so both sides run the same way."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo (~7 s) once, before forking
    out = tmp_path_factory.mktemp("reference") / "run"
    p = _start(sample_text, out, resume=False)
    p.join(120)
    assert p.exitcode == 0
    return out


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(tmp_path, sample_text, reference):
    out = tmp_path / "run"
    rng = random.Random(16)
    # where to kill: after a few logged steps, after k files of a save (1 train_state, 2 weights,
    # 3 tokenizer, 4 config: no manifest yet), and between the step folder's rename and `latest`
    points = [("steps", 2), ("save", 1), ("save", 2), ("save", 3), ("save", 4), ("commit", 0),
              ("steps", 3), ("save", 2), ("commit", 0), ("steps", 5), ("save", 4), ("save", 1),
              ("steps", rng.randint(1, 6)), ("commit", 0)]
    points += [(rng.choice(["steps", "save"]), rng.randint(1, 4)) for _ in range(6)]
    conditions = {"steps": lambda n, base: _metric_lines(out) >= base + n,
                  "save": lambda n, base: _saving(out, n),
                  "commit": lambda n, base: _committed_not_pointed(out)}
    tried = survived = 0
    for kind, n in points:
        had_checkpoint = is_checkpoint(out)
        before = resolve_checkpoint(out) if had_checkpoint else None
        base = _metric_lines(out)
        p = _start(sample_text, out, resume=had_checkpoint, pause=0.12)
        deadline = time.monotonic() + 60
        while p.is_alive() and not conditions[kind](n, base) and time.monotonic() < deadline:
            time.sleep(0.003)
        if not p.is_alive():  # finished before that point: nothing was killed
            break
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        tried += 1
        assert is_checkpoint(out) or not had_checkpoint, (kind, n)
        if is_checkpoint(out):
            # what is left loads, and is at least as new as what was there before the kill
            after = resolve_checkpoint(out)
            assert before is None or after.name >= before.name, (kind, n)
            open_checkpoint(out)
            load_train_state(resolve_checkpoint(out))
        survived += 1
    p = _start(sample_text, out, resume=is_checkpoint(out))
    p.join(120)
    assert p.exitcode == 0
    assert _history(out) == _history(reference)
    for (k, a), b in zip(_weights(reference).items(), _weights(out).values()):
        assert torch.equal(a, b), k
    assert (out / LATEST).read_text() == f"step-{STEPS:06d}\n"
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-{STEPS - EVAL:06d}", f"step-{STEPS:06d}"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # leftovers cleaned
    print(f"\nkills survived / tried: {survived} / {tried}")
    assert tried >= 12 and survived == tried


# ---------------------------------------------------------------------------- damaged files
DAMAGES = {
    "flip": lambda p: p.write_bytes(_flipped(p.read_bytes())),
    "truncate": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "delete": lambda p: p.unlink(),
}


def _flipped(data: bytes) -> bytes:
    """64 bytes inverted in the middle of the file (all of it if shorter)."""
    mid = max(0, len(data) // 2 - 32)
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]


@pytest.mark.slow
def test_every_damaged_file_is_detected_named_and_skipped_on_resume(tmp_path, reference):
    good = tmp_path / "good"
    shutil.copytree(reference, good)
    newest, older = good / f"step-{STEPS:06d}", good / f"step-{STEPS - EVAL:06d}"
    names = sorted(p.name for p in newest.iterdir())
    assert {"manifest.json", "config.json", "model.safetensors", "train_state.pt", "tokenizer_meta.json"} <= set(names)
    tried = detected = 0
    for name in names:
        for how, damage in DAMAGES.items():
            run = tmp_path / f"{name}-{how}"
            shutil.copytree(good, run)
            damage(run / newest.name / name)
            tried += 1
            with pytest.raises(GptkitError) as e:
                open_checkpoint(run)
            message = str(e.value)
            assert f"{run / newest.name / name}:" in message and "\n" not in message, message
            assert f"newest intact checkpoint is {run / older.name}" in message
            warnings: list[str] = []
            assert resume_candidate(run, warnings.append) == run / older.name
            assert len(warnings) == 1 and name in warnings[0]
            detected += 1
    print(f"\ncorruptions detected / tried: {detected} / {tried}")
    assert detected == tried == 3 * len(names)


def test_resume_falls_back_past_damaged_weights_and_matches(tmp_path, sample_text, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    DAMAGES["flip"](run / f"step-{STEPS:06d}" / "model.safetensors")
    # continue the (already finished) run: it falls back to step 20, reruns 21..24
    model, data, cfg, tok, src = _setup(sample_text, run, resume=True)
    assert src.name == f"step-{STEPS - EVAL:06d}"
    torch.set_num_threads(1)
    logs: list[str] = []
    train(model, data, cfg, tok, resume=src, log=logs.append)
    assert any("not intact" in m for m in logs)
    assert _history(run) == _history(reference)
    for (k, a), b in zip(_weights(reference).items(), _weights(run).values()):
        assert torch.equal(a, b), k


def test_hash_checks_can_be_skipped_but_sizes_are_always_checked(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    weights = run / f"step-{STEPS:06d}" / "model.safetensors"
    set_verify_hashes(False)
    try:
        open_checkpoint(run)
        weights.write_bytes(weights.read_bytes()[:-1])
        with pytest.raises(GptkitError, match="model.safetensors: damaged"):
            open_checkpoint(run)
    finally:
        set_verify_hashes(True)


def test_cli_names_the_damaged_file_in_one_line(tmp_path, reference):
    from gptkit.cli import app

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    DAMAGES["flip"](run / f"step-{STEPS:06d}" / "model.safetensors")
    result = CliRunner().invoke(app, ["generate", str(run), "--prompt", "def", "--max-tokens", "2"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors: damaged" in lines[0], result.output
    # the intact older step folder is accepted directly
    result = CliRunner().invoke(app, ["generate", str(run / f"step-{STEPS - EVAL:06d}"), "--prompt", "def",
                                      "--max-tokens", "2", "--temperature", "0"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------- one-line errors
def _flat(reference: Path, dest: Path) -> Path:
    """The reference's newest checkpoint as a flat folder without a manifest (the old layout),
    so damage reaches the parsers instead of the manifest check."""
    shutil.copytree(reference / f"step-{STEPS:06d}", dest)
    (dest / "manifest.json").unlink()
    return dest


@pytest.mark.parametrize("name, content, expected", [
    ("config.json", None, "config.json: field 'n_layer' is 'x', expected int"),
    ("config.json", b"{not json", "config.json: invalid JSON"),
    ("config.json", b"[1, 2]", "config.json: missing field 'model'"),
    ("tokenizer_meta.json", b"\x00garbage", "tokenizer_meta.json: damaged tokenizer files"),
    ("tokenizer_meta.json", b'{"kind": "char"}', "tokenizer_meta.json: damaged tokenizer files"),
    ("model.safetensors", b"garbage" * 10, "model.safetensors: cannot read weights"),
    ("train_state.pt", b"garbage" * 10, "train_state.pt: cannot read"),
    ("train_state.pt", "half", "train_state.pt: cannot read"),
])
def test_damaged_flat_checkpoint_files_are_one_line_errors(tmp_path, reference, name, content, expected):
    ckpt = _flat(reference, tmp_path / "flat")
    path = ckpt / name
    if content is None:
        cfg = json.loads(path.read_text())
        cfg["model"]["n_layer"] = "x"
        path.write_text(json.dumps(cfg))
    elif content == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(GptkitError) as e:
        open_checkpoint(ckpt)
        open_tokenizer(ckpt)
        load_train_state(resolve_checkpoint(ckpt))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_partial_last_metrics_line_is_dropped_on_resume(tmp_path, sample_text, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / f"step-{STEPS:06d}")  # resume from step 20
    (run / "latest").write_text(f"step-{STEPS - EVAL:06d}\n")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 25, "lo')  # a kill in the middle of a write
    model, data, cfg, tok, src = _setup(sample_text, run, resume=True)
    torch.set_num_threads(1)
    logs: list[str] = []
    train(model, data, cfg, tok, resume=src, log=logs.append)
    assert any("dropped a partial last line" in m for m in logs)
    assert _history(run) == _history(reference)
    # a damaged line that is not the last is an error naming it
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    model, data, cfg, tok, src = _setup(sample_text, run, resume=True)
    with pytest.raises(GptkitError, match=r"metrics.jsonl:4: damaged metrics line"):
        train(model, data, cfg, tok, resume=src, log=logs.append)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_files_follow_the_umask(tmp_path, umask, mode):
    """Atomic writes go through a private temp file; the file in place has the mode the umask gives."""
    from gptkit.checkpoint.format import save_checkpoint

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    old = os.umask(umask)
    try:
        step = save_checkpoint(tmp_path / "run", model, CharTokenizer.train(["abc"]), step=1)
    finally:
        os.umask(old)
    files = [p for p in step.rglob("*") if p.is_file()]
    assert files and {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: mode for p in files}
