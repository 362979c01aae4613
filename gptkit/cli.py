"""`gptkit <command>`: one typed function per command, dispatched by Typer.

Commands are thin: they parse options, call a stage module, and print a short summary.
A GptkitError (a user mistake) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.config import GptkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build your own GPT: tokenize, pretrain, fine-tune, evaluate, generate, serve.")


@app.callback()
def _root() -> None:
    """gptkit: build your own GPT end to end."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


# ---------------------------------------------------------------------------- info
@app.command()
def info(
    preset: Annotated[Optional[str], typer.Option(help="a preset name, e.g. gpt2, gpt3-175b, tiny")] = None,
    ckpt: Annotated[Optional[Path], typer.Option(help="a checkpoint folder instead of a preset")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Parameter count, training FLOPs per token and memory of a model, without allocating it."""
    from gptkit.config import PRESETS
    from gptkit.stats import model_stats

    if (preset is None) == (ckpt is None):
        _fail(f"give exactly one of --preset NAME or --ckpt DIR (presets: {', '.join(PRESETS)})")
    if preset is not None:
        from gptkit.config import preset as get_preset

        cfg, name = get_preset(preset), preset
    else:
        from gptkit.checkpoint import read_config
        from gptkit.config import ModelConfig

        cfg, name = ModelConfig.from_dict(read_config(ckpt)["model"]), str(ckpt)
    stats = model_stats(cfg)
    if json_out:
        typer.echo(json.dumps({"name": name, **stats}))
        return
    typer.echo(f"{name}: n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} "
               f"context={cfg.block_size} vocab={cfg.vocab_size} positions={cfg.pos_encoding}")
    typer.echo(f"  parameters            {_human(stats['params'])} ({stats['params']:,})")
    typer.echo(f"  non-embedding params  {_human(stats['non_embedding_params'])} ({stats['non_embedding_params']:,})")
    typer.echo(f"  training FLOPs/token  {stats['train_flops_per_token']:.3e}  (6N + 12·n_layer·n_embd·context)")
    typer.echo(f"  weights fp32 / bf16   {_gib(stats['weights_bytes_fp32'])} / {_gib(stats['weights_bytes_bf16'])}")
    typer.echo(f"  AdamW state (fp32)    {_gib(stats['adamw_state_bytes'])}  (+ fp32 grads {_gib(stats['grad_bytes_fp32'])})")


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    try:
        app()
    except GptkitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
