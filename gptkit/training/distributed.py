"""Training on several processes: joining a torchrun job, and spreading the model over it.

Two strategies (TrainConfig.strategy, `--strategy`):
  ddp   every process holds the whole model, gradients are averaged (DistributedDataParallel).
        Fastest while weights + gradients + AdamW state (16 bytes per parameter) fit one device.
  fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block and the rest of the
        model are sharded over the processes, so each holds 1/N of weights, gradients and AdamW
        state and gathers one block's weights at a time. For models that do not fit one device.
        With bf16 (`--dtype bfloat16`, or auto on a GPU that has it) weights are gathered and
        computed in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy).

Checkpoints stay one consolidated safetensors file: under FSDP the full weights and optimizer
state are gathered to rank 0 (on the CPU) before it writes them, and a resumed run shards them
again, so a checkpoint is loadable by every command and resumable under the same world size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gptkit.config import TrainConfig
from gptkit.device import resolve_device


@dataclass
class Dist:
    """Where this process sits in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun job if there is one: gloo on CPU, nccl on GPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend=backend)
    return d


def close_distributed(dist_info: Dist) -> None:
    if dist_info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(dist_info: Dist) -> torch.device:
    """This process's device (gptkit.device's auto): under torchrun, the GPU of its local rank."""
    return resolve_device("auto", index=dist_info.local_rank)


def wrap(model: torch.nn.Module, cfg: TrainConfig, dist_info: Dist, amp_dtype: torch.dtype | None) -> torch.nn.Module:
    """The module the training loop calls: model itself (one process), DDP around it, or model
    sharded in place by FSDP2. Build the optimizer after this: FSDP replaces the parameters."""
    for block in getattr(model, "h", []):
        block.checkpoint = cfg.activation_checkpointing
    if dist_info.world_size == 1:
        return model
    if cfg.strategy == "ddp":
        device = next(model.parameters()).device
        # heads (classification) sit out the language-model batches of a mixture
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=hasattr(model, "heads"))
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if amp_dtype == torch.bfloat16 else MixedPrecisionPolicy())
    for block in model.h:  # one all-gather per block: only one block's full weights live at a time
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # the rest: embeddings (tied to the LM head), final norm, heads
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_sync(runner: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(runner, DDP) and not sync:
        return runner.no_sync()
    if is_sharded(runner):
        runner.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _full(cpu_offload: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP the whole state dict, gathered on rank 0 (empty elsewhere); a collective, so
    every process calls it. None when the model is not sharded: it can be read directly."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state to save; under FSDP gathered whole on rank 0 (a collective) and
    keyed by parameter name, so a resumed run can shard it again."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full(cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # every process read the full state from the checkpoint; each keeps its own shard
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_full(cpu_offload=False))


def processes(dist_info: Dist, cfg: TrainConfig, device: torch.device) -> str:
    """'2 process(es) on cpu, fsdp, adamw' for the start line of a run."""
    text = f"{dist_info.world_size} process(es) on {device}"
    if dist_info.world_size > 1:
        text += f", {cfg.strategy}"
    return text + f", {cfg.optimizer}" + (" (fsdp shards over several processes: one trains unsharded)"
                                          if cfg.strategy == "fsdp" and dist_info.world_size == 1 else "")


def is_main_process() -> bool:
    """True in a plain run and in rank 0 of a torchrun job (read from the environment, so it can be
    asked before or after the process group exists): the process that prints a job's summary."""
    return int(os.environ.get("RANK", "0")) == 0
