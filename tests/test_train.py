"""The trainer: exact resume, NaN stop, LR schedule, optimizer groups, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gptkit.checkpoint import load_model, load_train_state, save_checkpoint
from gptkit.config import GptkitError, ModelConfig, TrainConfig
from gptkit.data import TokenShards
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer
from gptkit.train import configure_optimizer, lr_at, train


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


def test_resume_matches_uninterrupted_run(tmp_path, char_data):
    tok = char_data[0]
    train(_model(tok), _data(char_data), _cfg(tmp_path / "a"), tok, log=lambda m: None)

    train(_model(tok), _data(char_data), _cfg(tmp_path / "b", stop_at=13), tok, log=lambda m: None)
    assert load_train_state(tmp_path / "b")["step"] == 13
    resumed, _ = load_model(tmp_path / "b")
    train(resumed.train(), _data(char_data), _cfg(tmp_path / "b"), tok, resume=True, log=lambda m: None)

    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in a] == list(range(1, 25))
    assert a == b  # bit-identical losses at every step, dropout included
    wa, _ = load_model(tmp_path / "a")
    wb, _ = load_model(tmp_path / "b")
    for (ka, va), (kb, vb) in zip(wa.state_dict().items(), wb.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_training_lowers_val_loss_and_writes_artifacts(tmp_path, char_data):
    tok = char_data[0]
    last = train(_model(tok, dropout=0.0), _data(char_data), _cfg(tmp_path, max_steps=60, eval_interval=30), tok,
                 log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] < np.log(tok.vocab_size) + 0.5
    assert last["val_ppl"] == pytest.approx(np.exp(last["val_loss"]))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("model.safetensors", "config.json", "train_state.pt", "tokenizer_meta.json"):
        assert (tmp_path / name).is_file()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, char_data):
    tok = char_data[0]
    model = _model(tok)
    calls = {"n": 0}

    def poisoned(m, batch):
        calls["n"] += m.training
        loss = m(batch[0], targets=batch[1])
        return loss * float("nan") if calls["n"] > 10 and m.training else loss

    with pytest.raises(GptkitError, match=r"loss became nan at step 11.*last good checkpoint"):
        train(model, _data(char_data), _cfg(tmp_path, eval_interval=5), tok, loss_fn=poisoned, log=lambda m: None)
    good, cfg = load_model(tmp_path)
    assert cfg["step"] == 10
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_interrupted_save_is_detected(tmp_path, char_data):
    tok = char_data[0]
    model = _model(tok)
    save_checkpoint(tmp_path, model, tok, step=5, train_state={"x": torch.zeros(1)})
    # a crash after train_state.pt and the weights of step 6, before config.json of step 6
    save_checkpoint(tmp_path / "next", model, tok, step=6, train_state={"x": torch.zeros(1)})
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "next" / "model.safetensors").read_bytes())
    with pytest.raises(GptkitError, match="weights are from step 6 but config.json says step 5"):
        load_model(tmp_path)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_weight_decay_on_matrices_only():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
