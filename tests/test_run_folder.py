"""Run folders that cannot be shared or misread: one training run per --out (a lock naming its
holder, taken over when the holder died), and a step folder without its manifest treated as
damaged (never loaded unverified, never deleted, moved aside with a warning)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from gptkit.checkpoint.format import save_checkpoint
from gptkit.checkpoint.rundir import RunLock, clean_leftovers, resolve_checkpoint, resume_candidate
from gptkit.cli import app
from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import CharTokenizer

from test_finetune import make_base, write_jsonl

QA = [{"prompt": f"what is {a}+{b}? ", "completion": str(a + b)} for a in range(4) for b in range(4)]


def _run_with_two_steps(run):
    tok = CharTokenizer(sorted(set("abc 123")))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    for step in (1, 2):
        save_checkpoint(run, model, tok, step=step)
    return run


def test_a_step_folder_without_its_manifest_is_damaged_not_loaded(tmp_path):
    run = _run_with_two_steps(tmp_path / "run")
    (run / "step-000002" / "manifest.json").unlink()
    for folder in (run / "step-000002", run):  # given directly, or through `latest`
        with pytest.raises(GptkitError, match=r"step-000002/manifest.json: missing.*"
                                              r"the newest intact checkpoint is .*step-000001"):
            resolve_checkpoint(folder)
    r = CliRunner().invoke(app, ["generate", str(run / "step-000002"), "-p", "a", "--max-tokens", "1"])
    assert r.exit_code == 2 and "manifest.json: missing" in r.output and "Traceback" not in r.output


def test_resume_moves_a_step_folder_without_manifest_aside_and_never_deletes_it(tmp_path):
    run = _run_with_two_steps(tmp_path / "run")
    (run / "step-000002" / "manifest.json").unlink()
    (run / ".step-000003.tmp-123").mkdir()  # what a killed save really leaves: removed
    warnings: list[str] = []
    assert clean_leftovers(run, warnings.append) == [".step-000003.tmp-123"]
    assert (run / "step-000002.damaged" / "model.safetensors").is_file() and not (run / "step-000002").exists()
    assert len(warnings) == 1 and "step-000002 has no manifest.json" in warnings[0] and "step-000002.damaged" in warnings[0]
    assert resume_candidate(run, warnings.append) == run / "step-000001"


HOLDER = textwrap.dedent("""
    import sys, time
    from gptkit.checkpoint.rundir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_one_run_per_folder_and_a_dead_holders_lock_is_taken(tmp_path):
    base = make_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["finetune", base, data, "--out", str(out), "--max-steps", "2", "--no-progress"]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines()[-1] == (f"error: {out}: in use by process {holder.pid} on {socket.gethostname()} "
                                    f"(since {r.output.split('(since ')[1].split(')')[0]}); wait for that run to end "
                                    "(or stop it), or give another --out")
        os.kill(holder.pid, signal.SIGKILL)  # as a killed launcher's worker dies: the kernel drops its lock
        holder.wait(10)
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "done: step 2" in r.output, r.output
    finally:
        holder.kill()
    with RunLock(out):  # released when the run ended
        pass


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(GptkitError, match=rf"in use by process {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("new_there", [True, False], ids=["new-complete", "new-missing"])
def test_a_kill_between_the_two_renames_of_a_replacement_loses_nothing(tmp_path, new_there):
    from gptkit.fileio import temp_folder_beside

    out, pid = tmp_path / "data", _dead_pid()
    (tmp_path / f".data.old-{pid}").mkdir()
    (tmp_path / f".data.old-{pid}" / "meta.json").write_text("old")
    if new_there:
        (tmp_path / f".data.tmp-{pid}").mkdir()
        (tmp_path / f".data.tmp-{pid}" / "meta.json").write_text("new")
    tmp = temp_folder_beside(out)  # what the next `prepare` into the same --out does first
    assert (out / "meta.json").read_text() == ("new" if new_there else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data", tmp.name])


def test_a_step_saved_again_and_killed_between_renames_is_finished(tmp_path):
    run = _run_with_two_steps(tmp_path / "run")
    pid = _dead_pid()
    os.rename(run / "step-000002", run / f".step-000002.old-{pid}")
    shutil.copytree(run / f".step-000002.old-{pid}", run / f".step-000002.tmp-{pid}")
    warnings: list[str] = []
    clean_leftovers(run, warnings.append)
    assert resolve_checkpoint(run) == run / "step-000002"  # complete and verified
    assert warnings == [f"finished the interrupted replacement of step-000002 (by process {pid})"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_resuming_a_muon_run_under_fsdp_gets_advice_that_works(tmp_path):
    from gptkit.config import TrainConfig
    from gptkit.training.resume import check_same_optimizer

    tok = CharTokenizer(sorted(set("abc")))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    step = save_checkpoint(tmp_path / "run", model, tok, step=1, train_config=TrainConfig(optimizer="muon"))
    with pytest.raises(GptkitError, match=r"trained with Muon, which --strategy fsdp cannot run .* resume it with "
                                          r"--strategy ddp$"):
        check_same_optimizer(step, TrainConfig(strategy="fsdp"))
    with pytest.raises(GptkitError, match=r"resume it with --optimizer muon \(not adamw\)"):
        check_same_optimizer(step, TrainConfig(optimizer="adamw"))
