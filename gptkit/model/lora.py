"""LoRA (Hu et al. 2021): low-rank adapters on the model's Linear layers, and merging them back.

A LoRALinear computes  y = x W^T + b + (alpha / r) * dropout(x) A^T B^T  with W, b frozen and
only A (r, in) and B (out, r) trained. B starts at zero, so an adapted model starts out
computing exactly what its base computes. The layer keeps the names `weight` and `bias`, so
a base checkpoint's keys load into an adapted model unchanged and an adapter checkpoint
only has to add `*.lora_A` / `*.lora_B`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.errors import GptkitError

TARGETS = ("c_attn", "c_proj", "c_fc")  # every matrix of attention and MLP; not wte / lm_head


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise GptkitError(f"LoRA rank={self.rank} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise GptkitError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise GptkitError(f"LoRA targets {sorted(unknown) or '(none)'}: expected some of {', '.join(TARGETS)}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Linear):
    """A frozen Linear plus a trainable low-rank update; shares the base layer's tensors."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weights are the base's, not new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init
        self.scale = cfg.alpha / cfg.rank
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function: W + (alpha / r) B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) for every module whose own name is one of names."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if attr in names and isinstance(child, nn.Linear):
                found.append((parent, attr, child))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Wrap the target Linear layers in LoRALinear (in place); returns how many were wrapped."""
    found = [t for t in _targets(model, cfg.targets) if not isinstance(t[2], LoRALinear)]
    if not found:
        raise GptkitError(f"no Linear layers named {', '.join(cfg.targets)} to adapt")
    for parent, attr, layer in found:
        setattr(parent, attr, LoRALinear(layer, cfg))
    return len(found)


def mark_trainable(model: nn.Module, also: tuple[str, ...] = ("heads.",)) -> int:
    """Freeze everything but the adapters (and names starting with `also`, e.g. new heads);
    returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name or name.startswith(also)
        n += p.numel() if p.requires_grad else 0
    return n


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer (in place); returns how many were merged."""
    found = [(parent, attr, layer) for parent in model.modules()
             for attr, layer in parent.named_children() if isinstance(layer, LoRALinear)]
    for parent, attr, layer in found:
        setattr(parent, attr, layer.merged())
    return len(found)
