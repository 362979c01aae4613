"""What a run leaves to read besides its checkpoints: metrics.jsonl, the progress bar or log lines,
and loss.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from gptkit.config import TrainConfig
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write
from gptkit.training.distributed import Dist


def read_history(path: Path, warn: Callable[[str], None] = print) -> list[dict]:
    """metrics.jsonl's entries. A partial last line (a kill while it was written) is dropped
    with a warning; a damaged line elsewhere is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    entries = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                warn(f"warning: {path}:{i + 1}: dropped a partial last line (the run was killed while writing it)")
                break
            raise GptkitError(f"{path}:{i + 1}: damaged metrics line ({e})") from None
        entries.append(entry)
    return entries


def format_eval(step: int, ev: dict) -> str:
    return f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items())


def progress_bar(start: int, cfg: TrainConfig, dist_info: Dist):
    # Off when stderr is not a terminal (logs, CI): the loop then logs a plain line every 10%.
    return tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and dist_info.master and sys.stderr.isatty()), mininterval=0.5)


def plot(history: list[dict], path: Path) -> None:
    """Train and validation loss against step, written next to the checkpoint."""
    import matplotlib  # imported when the first plot is drawn: matplotlib costs a second at start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
