"""`gptkit pretrain`, `finetune` and `merge-lora`: the commands that train or change weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli.common import app, config_options, fail, human
from gptkit.config import FinetuneTrainConfig, ModelConfig, TrainConfig


# ---------------------------------------------------------------------------- pretrain
@app.command()
@config_options(TrainConfig, flags={"out_dir": "out"})
@config_options(ModelConfig, into="model", overrides=True, skip=("vocab_size",))
def pretrain(
    data: Annotated[Path, typer.Argument(help="a folder made by `gptkit prepare`")],
    preset: Annotated[Optional[str], typer.Option(help="model preset (see `gptkit info`; default tiny); the model "
                                                      "options below change it")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="start from this checkpoint's weights")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out exactly where it stopped")] = False,
    *,
    cfg: TrainConfig,
    model: dict,
) -> None:
    """Pretrain a GPT on prepared token shards. Runs unchanged under torchrun (DDP or FSDP)."""
    from gptkit.config import preset as get_preset
    from gptkit.training.distributed import is_main_process
    from gptkit.training.pretrain import pretrain as run

    model_cfg = dataclasses.replace(get_preset(preset or "tiny"), **model)
    last = run(data, model_cfg, cfg, init_from=str(init_from) if init_from else None, resume=resume,
               log=lambda m: typer.echo(m, err=True), model_asked=preset is not None or bool(model))
    if is_main_process():
        typer.echo(f"done: step {last.get('step')} loss {last.get('loss', float('nan')):.4f}"
                   + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
                   + f"; checkpoint in {cfg.out_dir}")


# ---------------------------------------------------------------------------- fine-tuning
@app.command()
@config_options(FinetuneTrainConfig, flags={"out_dir": "out"})
def finetune(
    base: Annotated[Path, typer.Argument(help="the checkpoint to start from")],
    data: Annotated[list[str], typer.Argument(help="data files, each PATH or PATH@WEIGHT (several: a multi-task "
                                                   "mixture). .jsonl with messages | prompt/completion | "
                                                   "text/label | text records, plain text, or (--method dpo) "
                                                   "prompt/chosen/rejected pairs")],
    method: Annotated[str, typer.Option(help="sft: learn the targets | dpo: prefer each pair's chosen answer "
                                             "over its rejected one (Direct Preference Optimization)")] = "sft",
    beta: Annotated[float, typer.Option(help="dpo: how far the model may move from the reference (higher: "
                                             "less)")] = 0.1,
    sft_weight: Annotated[float, typer.Option(help="dpo: plus this times the chosen answers' negative log-likelihood "
                                                   "per token (RPO; keeps them likely, see docs/preference.md)")] = 0.0,
    ref: Annotated[Optional[Path], typer.Option(help="dpo: the reference checkpoint (default: the base itself; "
                                                     "its log-probabilities are computed once, before training)")] = None,
    task: Annotated[str, typer.Option(help="auto | lm | classify: what the data must be")] = "auto",
    val: Annotated[Optional[list[str]], typer.Option(help="a validation file per data file, in order "
                                                          "(default: --val-fraction of each)")] = None,
    val_fraction: Annotated[float, typer.Option(help="share of records held out for validation")] = 0.05,
    skip_bad: Annotated[bool, typer.Option(help="skip malformed records (counted) instead of stopping")] = False,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tuning")] = 0,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha/rank)")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="dropout on the LoRA input")] = 0.0,
    lora_targets: Annotated[str, typer.Option(help="comma-separated layers to adapt")] = "c_attn,c_proj,c_fc",
    resume: Annotated[bool, typer.Option(help="continue the run in --out where it stopped")] = False,
    *,
    cfg: FinetuneTrainConfig,
) -> None:
    """Fine-tune a checkpoint (full or LoRA) on chat, completion, classification or text data, or on preference
    pairs with DPO (torchrun: DDP/FSDP)."""
    from gptkit.model.lora import LoRAConfig
    from gptkit.training.distributed import is_main_process
    from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune as run

    specs = [DataSpec.parse(d) for d in data]
    if val:
        if len(val) != len(specs):
            fail(f"{len(val)} --val file(s) for {len(specs)} data file(s): give one per data file, in order")
        for spec, v in zip(specs, val):
            spec.val = v
    lora = LoRAConfig(lora_rank, lora_alpha, lora_dropout, tuple(lora_targets.split(","))) if lora_rank else None
    ft = FinetuneConfig(task=task, method=method, beta=beta, sft_weight=sft_weight, ref=str(ref) if ref else None, lora=lora,
                        val_fraction=val_fraction, skip_bad=skip_bad)
    last = run(base, specs, cfg, ft, resume=resume, log=lambda m: typer.echo(m, err=True))
    if is_main_process():
        typer.echo(f"done: step {last.get('step')} loss {last.get('loss', float('nan')):.4f}"
                   + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
                   + f"; {last['weights']} {last['method'].upper()}, {last['trainable_params']:,} trained parameters; checkpoint in {cfg.out_dir}")


@app.command("merge-lora")
def merge_lora(
    ckpt: Annotated[Path, typer.Argument(help="a LoRA checkpoint from `gptkit finetune --lora-rank R`")],
    out: Annotated[Path, typer.Argument(help="folder for the standalone merged checkpoint")],
) -> None:
    """Fold LoRA adapters into their layers: a full checkpoint with identical outputs, no base needed."""
    from gptkit.checkpoint.open import merge_lora_checkpoint

    n, model = merge_lora_checkpoint(ckpt, out)
    typer.echo(f"merged {n} LoRA layers of {ckpt} into {out} ({human(model.num_params())} params)")
