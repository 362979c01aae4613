"""`gptkit info`: size, FLOPs and memory of a model, without allocating it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli.common import app, fail, gib, human


# ---------------------------------------------------------------------------- info
@app.command()
def info(
    preset: Annotated[Optional[str], typer.Option(help="a preset name, e.g. gpt2, gpt3-175b, tiny")] = None,
    ckpt: Annotated[Optional[Path], typer.Option(help="a checkpoint folder instead of a preset")] = None,
    world_size: Annotated[Optional[int], typer.Option(help="also print training memory per device for this "
                                                           "many processes, DDP vs FSDP")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Parameter count, training FLOPs per token and memory of a model, without allocating it."""
    from gptkit.config import PRESETS
    from gptkit.model.size import model_stats, per_device_memory

    if (preset is None) == (ckpt is None):
        fail(f"give exactly one of --preset NAME or --ckpt DIR (presets: {', '.join(PRESETS)})")
    if preset is not None:
        from gptkit.config import preset as get_preset

        cfg, name = get_preset(preset), preset
    else:
        from gptkit.checkpoint.open import read_meta

        cfg, name = read_meta(ckpt).model, str(ckpt)
    stats = model_stats(cfg)
    if world_size is not None:
        if world_size < 1:
            fail(f"--world-size {world_size}: must be at least 1")
        stats["per_device"] = {"world_size": world_size, **per_device_memory(cfg, world_size)}
    if json_out:
        typer.echo(json.dumps({"name": name, **stats}))
        return
    kv = f" n_kv_head={cfg.kv_heads}" if cfg.kv_heads != cfg.n_head else ""
    typer.echo(f"{name}: n_layer={cfg.n_layer} n_head={cfg.n_head}{kv} n_embd={cfg.n_embd} "
               f"context={cfg.block_size} vocab={cfg.vocab_size} positions={cfg.pos_encoding} norm={cfg.norm} "
               f"mlp={cfg.activation}")
    typer.echo(f"  parameters            {human(stats['params'])} ({stats['params']:,})")
    typer.echo(f"  non-embedding params  {human(stats['non_embedding_params'])} ({stats['non_embedding_params']:,})")
    typer.echo(f"  training FLOPs/token  {stats['train_flops_per_token']:.3e}  (6N + 12·n_layer·n_embd·context)")
    typer.echo(f"  weights fp32 / bf16   {gib(stats['weights_bytes_fp32'])} / {gib(stats['weights_bytes_bf16'])}")
    typer.echo(f"  AdamW state (fp32)    {gib(stats['adamw_state_bytes'])}  (+ fp32 grads {gib(stats['grad_bytes_fp32'])})")
    kv_token = stats["kv_cache_bytes_per_token_fp32"]
    typer.echo(f"  KV cache (fp32)       {kv_token / 1024:,.1f} KiB per token, {gib(kv_token * cfg.block_size)} "
               "per full-context sequence")
    if world_size is not None:
        from gptkit.model.size import format_per_device

        typer.echo(format_per_device(stats["per_device"]))
