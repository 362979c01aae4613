"""`gptkit recipe NAME`: the recipes by name, each run into its own folder per scale and seed."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from gptkit.config import TrainConfig
from gptkit.errors import GptkitError
from gptkit.recipes.finetune import FAST, FULL, Log, arithmetic, classify_recipe, docs_assistant, multitask
from gptkit.recipes.preference import preference
from gptkit.recipes.tools import tools

RECIPES: dict[str, Callable[..., dict]] = {"arithmetic": arithmetic, "docs": docs_assistant,
                                           "classify": classify_recipe, "multitask": multitask,
                                           "preference": preference, "tools": tools}


def run_recipe(name: str, out: str | Path, *, base: str | None = None, fast: bool = False, seed: int = 1337,
               optimizer: str = TrainConfig.optimizer, log: Log = print) -> dict:
    """Run one recipe into out/ (fast: the small version); returns its metrics."""
    if name not in RECIPES:
        raise GptkitError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    t0 = time.perf_counter()
    out = Path(out) / f"{'fast' if fast else 'full'}-seed{seed}"
    scale = dataclasses.replace(FAST if fast else FULL, optimizer=optimizer)
    result = RECIPES[name](out, scale, seed, log, base=base)
    return {**result, "seconds": round(time.perf_counter() - t0, 1)}
