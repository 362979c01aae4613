"""`gptkit pretrain`: a GPT (new, from a checkpoint, or resumed) trained on prepared token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from gptkit.checkpoint.open import open_checkpoint
from gptkit.config import TrainConfig
from gptkit.data.shards import TokenShards, read_meta
from gptkit.errors import GptkitError
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import load_tokenizer
from gptkit.training.distributed import close_distributed, init_distributed, pick_device, processes
from gptkit.training.loop import train
from gptkit.training.resume import check_same_run, resume_checkpoint


def pretrain(data_dir: str | Path, model_config, cfg: TrainConfig, *, init_from: str | None = None,
             resume: bool = False, log: Callable[[str], None] = print, model_asked: bool = True) -> dict:
    """Pretrain a GPT on the token shards in data_dir (from `gptkit prepare`).

    A new model gets model_config (its vocab_size taken from the data's tokenizer);
    init_from starts from a checkpoint's weights instead; resume continues cfg.out_dir, whose
    model must be model_config when model_asked (the caller was given a preset or model options).
    """
    dist_info = init_distributed()
    log = log if dist_info.master else (lambda _: None)  # one process speaks for the job
    device = pick_device(dist_info)
    meta = read_meta(data_dir)
    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
    data_id = {"path": str(Path(data_dir).resolve()), "vocab_size": meta["vocab_size"],
               "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"]}
    if resume:  # the newest intact checkpoint; train() restores the rest of its state from it
        ckpt = resume_checkpoint(cfg.out_dir, log)
        check_same_run(ckpt, model_config if model_asked else None, data_id)
        model, resume = ckpt.model, ckpt.meta.path
    elif init_from:
        model = open_checkpoint(init_from).model
    else:
        model_config.vocab_size = tokenizer.vocab_size
        torch.manual_seed(cfg.seed)  # the same initial weights in every process and every rerun
        model = GPT(model_config)
    if model.config.vocab_size < meta["vocab_size"]:
        raise GptkitError(f"model vocab_size {model.config.vocab_size} < the data's tokenizer vocab "
                          f"{meta['vocab_size']} ({data_dir})")
    model.to(device).train()
    data = TokenShards.from_dir(data_dir, model.config.block_size, cfg.batch_size, seed=cfg.seed,
                       eval_batches=cfg.eval_batches, rank=dist_info.rank, world_size=dist_info.world_size)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {processes(dist_info, cfg, device)}; "
        f"train tokens {meta['splits']['train']['tokens']:,}, val {meta['splits']['val']['tokens']:,}")
    try:
        return train(model, data, cfg, tokenizer, resume=resume, dist_info=dist_info, log=log,
                     extra={"data": data_id})
    finally:
        close_distributed(dist_info)

