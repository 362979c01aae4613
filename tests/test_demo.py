"""`make demo`'s pipeline at a tiny size, and how it picks its device."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from gptkit.checkpoint.open import open_checkpoint
from gptkit.errors import GptkitError
from gptkit.config import ModelConfig
from gptkit.recipes.demo import GPU_SIZE, QUIZ, DemoConfig, demo_device, run_demo


def test_the_cpu_keeps_the_demo_size_and_a_gpu_gets_the_bigger_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, device = demo_device(DemoConfig())
    assert device.type == "cpu" and cfg.model == DemoConfig().model and cfg.steps is None  # steps by time
    with pytest.raises(GptkitError, match="sees no CUDA GPU"):
        demo_device(DemoConfig(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg, device = demo_device(DemoConfig())
    assert device.type == "cuda" and cfg.model == GPU_SIZE["model"] and cfg.batch_size == GPU_SIZE["batch_size"]
    cfg, device = demo_device(DemoConfig(device="cpu"))  # asked for: the CPU size, even with a GPU there
    assert device.type == "cpu" and cfg.model == DemoConfig().model


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_learns(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), vocab_size=512, steps=40, batch_size=8, device="cpu",
                     model=ModelConfig(vocab_size=512, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    lines = []
    result = run_demo(cfg, say=lines.append)
    assert result["device"].startswith("cpu")
    assert result["val_loss_after"] < result["val_loss_before"] - 0.5  # ln(512) = 6.24 at the start
    assert len(result["samples"]) == len(cfg.prompts)
    loaded = open_checkpoint(result["checkpoint"])
    assert (loaded.model.config.n_layer, loaded.model.config.block_size) == (1, 32)
    assert loaded.tokenizer.vocab_size == 512
    assert any(line.startswith("3/5 pretrain on cpu") and "40 steps (" in line and ", muon; " in line
               for line in lines)
    # the quiz: the same prompts before and after, each answer scored
    assert result["quiz_items"] == len(QUIZ) and 0 <= result["quiz_before"] <= result["quiz_items"]
    assert sum(line.startswith(("    ✓ ", "    ✗ ")) for line in lines) == len(QUIZ)


def test_the_time_budget_decides_the_steps(tmp_path, monkeypatch):
    """Steps = (budget left - reserve) / the measured step time - the evaluations' share, within bounds."""
    import gptkit.recipes.demo as demo

    measured = []

    def fake_step_time(*args) -> float:
        measured.append(time.perf_counter())
        return 0.05

    monkeypatch.setattr(demo, "seconds_per_step", fake_step_time)
    cfg = DemoConfig(out=str(tmp_path / "demo"), vocab_size=300, minutes=0.8, batch_size=4, device="cpu",
                     model=ModelConfig(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=16))
    started = time.perf_counter()
    result = run_demo(cfg, say=lambda line: None)
    left = demo.BUDGET_SHARE * cfg.minutes * 60 - (measured[0] - started) - demo.RESERVE_S
    expected = max(10, min(cfg.max_steps, int(left / 0.05) - demo.RESERVE_STEPS))
    assert abs(result["steps"] - expected) <= 1
    short = run_demo(dataclasses.replace(cfg, minutes=0.01, out=str(tmp_path / "short")), say=lambda line: None)
    assert short["steps"] == 10  # the floor: a budget already spent still trains a little

