"""The trainer: exact resume, NaN stop, LR schedule, optimizer groups, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptkit.checkpoint.open import open_checkpoint, open_tokenizer
from gptkit.checkpoint.rundir import resolve_checkpoint
from gptkit.checkpoint.format import load_train_state, save_checkpoint
from gptkit.errors import GptkitError
from gptkit.config import ModelConfig, TrainConfig
from gptkit.data.shards import TokenShards
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import CharTokenizer
from gptkit.training.loop import train
from gptkit.training.optim import configure_optimizer, lr_at


@pytest.fixture(scope="module")
def char_data(sample_text):
    tok = CharTokenizer.train([sample_text])
    ids = np.array(tok.encode(sample_text), dtype=np.uint16)
    n = int(0.9 * len(ids))
    return tok, ids[:n], ids[n:]


def _model(tok, dropout=0.1) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), max_steps=24, batch_size=4, lr=3e-3, warmup_steps=4, eval_interval=8,
                eval_batches=2, log_interval=1, progress=False)
    return TrainConfig(**{**base, **kw})


def _data(char_data, **kw) -> TokenShards:
    _, train_ids, val_ids = char_data
    return TokenShards([train_ids], [val_ids], 32, 4, seed=5, eval_batches=2, **kw)


def _losses(folder) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_matches_uninterrupted_run(tmp_path, char_data, optimizer):
    tok = char_data[0]
    train(_model(tok), _data(char_data), _cfg(tmp_path / "a", optimizer=optimizer), tok, log=lambda m: None)

    train(_model(tok), _data(char_data), _cfg(tmp_path / "b", stop_at=13, optimizer=optimizer), tok,
          log=lambda m: None)
    assert load_train_state(resolve_checkpoint(tmp_path / "b"))["step"] == 13
    resumed = open_checkpoint(tmp_path / "b").model
    train(resumed.train(), _data(char_data), _cfg(tmp_path / "b", optimizer=optimizer), tok, resume=True,
          log=lambda m: None)

    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in a] == list(range(1, 25))
    assert a == b  # bit-identical losses at every step, dropout included
    wa = open_checkpoint(tmp_path / "a").model
    wb = open_checkpoint(tmp_path / "b").model
    for (ka, va), (kb, vb) in zip(wa.state_dict().items(), wb.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_resuming_with_another_optimizer_is_one_line(tmp_path, char_data):
    tok = char_data[0]
    train(_model(tok), _data(char_data), _cfg(tmp_path, stop_at=4, optimizer="adamw"), tok, log=lambda m: None)
    with pytest.raises(GptkitError, match=r"step-000004 was trained with --optimizer adamw; resume it with "
                                          r"--optimizer adamw \(not muon\)"):
        train(_model(tok), _data(char_data), _cfg(tmp_path, optimizer="muon"), tok, resume=True, log=lambda m: None)


def test_the_default_optimizer_is_muon_except_under_fsdp():
    assert TrainConfig().optimizer == "muon"
    assert TrainConfig(strategy="fsdp").optimizer == "adamw"  # Muon needs whole matrices; FSDP shards them
    assert TrainConfig(optimizer="adamw").optimizer == "adamw"


def test_training_lowers_val_loss_and_writes_artifacts(tmp_path, char_data):
    tok = char_data[0]
    last = train(_model(tok, dropout=0.0), _data(char_data), _cfg(tmp_path, max_steps=60, eval_interval=30), tok,
                 log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] < np.log(tok.vocab_size) + 0.5
    assert last["val_ppl"] == pytest.approx(np.exp(last["val_loss"]))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "latest").read_text() == "step-000060\n"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000030", "step-000060"]
    for name in ("model.safetensors", "config.json", "train_state.pt", "tokenizer_meta.json", "manifest.json"):
        assert (tmp_path / "step-000060" / name).is_file()
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, char_data):
    tok = char_data[0]
    model = _model(tok)
    calls = {"n": 0}

    def poisoned(m, batch):
        calls["n"] += m.training
        loss = m(batch[0], targets=batch[1])
        return loss * float("nan") if calls["n"] > 10 and m.training else loss

    with pytest.raises(GptkitError, match=r"loss became nan at step 11; stopped without saving: the last good "
                                          r"checkpoint, .*step-000010, is kept"):
        train(model, _data(char_data), _cfg(tmp_path, eval_interval=5), tok, loss_fn=poisoned, log=lambda m: None)
    good, cfg = (loaded := open_checkpoint(tmp_path)).model, loaded.meta
    assert cfg.step == 10
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_nan_loss_before_any_save_says_there_is_none(tmp_path, char_data):
    tok = char_data[0]
    nan = lambda m, batch: m(batch[0], targets=batch[1]) * float("nan")  # noqa: E731
    with pytest.raises(GptkitError, match=r"loss became nan at step 1; stopped without saving: no checkpoint had been "
                                          r"saved in .* yet"):
        train(_model(tok), _data(char_data), _cfg(tmp_path / "run"), tok, loss_fn=nan, log=lambda m: None)


def _flat_checkpoint(folder, model, tok, step):
    """A checkpoint as written before the run layout: the files side by side in one folder."""
    step_dir = save_checkpoint(folder / "tmp", model, tok, step=step, train_state=None)
    folder.mkdir(exist_ok=True)
    for p in step_dir.iterdir():
        if p.name != "manifest.json":
            p.rename(folder / p.name)


def test_flat_checkpoint_from_before_the_run_layout_still_loads(tmp_path, char_data):
    tok = char_data[0]
    model = _model(tok)
    _flat_checkpoint(tmp_path / "old", model, tok, step=5)
    loaded, cfg = (loaded := open_checkpoint(tmp_path / "old")).model, loaded.meta
    assert cfg.step == 5
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # a crash in the middle of an old-style save is still detected
    _flat_checkpoint(tmp_path / "next", model, tok, step=6)
    (tmp_path / "old" / "model.safetensors").write_bytes((tmp_path / "next" / "model.safetensors").read_bytes())
    with pytest.raises(GptkitError, match="weights are from step 6 but config.json says step 5"):
        open_checkpoint(tmp_path / "old")


def test_run_folder_and_step_folder_both_load(tmp_path, char_data):
    tok = char_data[0]
    train(_model(tok), _data(char_data), _cfg(tmp_path, max_steps=16, keep=3), tok, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000008", "step-000016"]
    assert open_checkpoint(tmp_path).meta.step == 16
    assert open_checkpoint(tmp_path / "step-000008").meta.step == 8
    assert open_tokenizer(tmp_path).vocab_size == tok.vocab_size


def test_nan_gradient_stops_without_saving(tmp_path, char_data):
    tok = char_data[0]
    calls = {"n": 0}

    def poisoned(m, batch):  # a finite loss whose gradient is inf
        calls["n"] += m.training
        loss = m(batch[0], targets=batch[1])
        if calls["n"] > 6 and m.training:
            loss = loss + torch.sqrt((next(m.parameters()) * 0).sum())  # value 0, gradient nan
        return loss

    with pytest.raises(GptkitError, match=r"gradient norm became nan at step 7"):
        train(_model(tok), _data(char_data), _cfg(tmp_path, eval_interval=5), tok, loss_fn=poisoned, log=lambda m: None)
    assert open_checkpoint(tmp_path).meta.step == 5


def test_nan_weights_are_never_saved(tmp_path, char_data):
    tok = char_data[0]
    model = _model(tok)
    with torch.no_grad():
        model.wte.weight[0, 0] = float("nan")
    with pytest.raises(GptkitError, match="not saving step 3 .*wte.weight has NaN or inf"):
        save_checkpoint(tmp_path, model, tok, step=3)
    assert not list(tmp_path.iterdir())


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_weight_decay_on_matrices_only():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1, optimizer="adamw"), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_a_warmup_as_long_as_the_run_becomes_a_tenth_of_it(tmp_path, char_data):
    tok = char_data[0]
    said: list[str] = []
    train(_model(tok), _data(char_data), _cfg(tmp_path, max_steps=20, warmup_steps=100), tok, log=said.append)
    assert [m for m in said if m.startswith("warning")] == [
        "warning: --warmup-steps 100 >= --max-steps 20: the learning rate would never reach --lr nor decay; "
        "warming up over 2 steps (a tenth of the run) instead"]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert lrs[1] == pytest.approx(3e-3) and lrs[-1] < 3e-3 / 2  # the peak reached, then the cosine decay
