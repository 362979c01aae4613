"""`gptkit demo` and `recipe`: end-to-end runs that prove the pipeline learns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli.common import field_option, app
from gptkit.config import TrainConfig
from gptkit.errors import GptkitError


# ---------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the tokenizer, data and checkpoint go")] = Path("runs/demo"),
    minutes: Annotated[float, typer.Option(help="the whole demo's time budget: pretraining gets the steps that fit, "
                                                "timed on this machine")] = 5.0,
    steps: Annotated[Optional[int], typer.Option(help="pretraining steps instead of a time budget")] = None,
    optimizer: Annotated[str, field_option(TrainConfig, "optimizer")] = TrainConfig.optimizer,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (auto: a GPU when there is one, with a bigger "
                                             "model)")] = "auto",
) -> None:
    """The main job: tokenizer, corpus, pretraining, a quiz and samples on the Python standard library."""
    from gptkit.recipes.demo import DemoConfig, demo_device, run_demo

    if minutes <= 0 or (steps is not None and steps < 1):
        raise GptkitError(f"--minutes {minutes:g} and --steps {steps} must be positive")
    cfg, _ = demo_device(DemoConfig(out=str(out), optimizer=optimizer, device=device, minutes=minutes, steps=steps))
    result = run_demo(cfg, say=typer.echo)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "samples"}))


@app.command()
def recipe(
    name: Annotated[str, typer.Argument(help="arithmetic | docs | classify | multitask | preference | tools")],
    out: Annotated[Path, typer.Option(help="folder for the recipe's data and checkpoints")] = Path("runs/recipes"),
    base: Annotated[Optional[Path], typer.Option(help="docs: the base checkpoint (default runs/demo/model, "
                                                      "else a small one is trained first)")] = None,
    fast: Annotated[bool, typer.Option(help="a smaller, quicker version (what the tests run)")] = False,
    seed: Annotated[int, typer.Option(help="random seed")] = 1337,
    optimizer: Annotated[str, field_option(TrainConfig, "optimizer")] = TrainConfig.optimizer,
) -> None:
    """Prove learning end to end on locally generated data; the last line is one JSON object of metrics."""
    from gptkit.recipes.run import run_recipe

    metrics = run_recipe(name, out, base=str(base) if base else None, fast=fast, seed=seed, optimizer=optimizer,
                         log=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(metrics))
