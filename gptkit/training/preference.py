"""Preference tuning: Direct Preference Optimization (DPO, Rafailov et al. 2023) on the pairs
of gptkit.data.pairs, through the one trainer.

For a pair with answers c (chosen) and r (rejected) to the same prompt,

    loss = -log sigmoid(beta * ([log pi(c) - log ref(c)] - [log pi(r) - log ref(r)]))

averaged over pairs, where log p(answer) is the sum of the answer tokens' log-probabilities
under the model being trained (pi) and under a frozen reference (ref). beta * [log pi - log ref]
is an answer's implicit reward: training raises the chosen answer's reward relative to the
rejected one's, and beta sets how far the policy may drift from the reference to do it.

DPO alone only asks the chosen answer to gain on the rejected one; it can meet that by pushing
the rejected one down while the chosen one falls too, and the freed probability goes to
answers neither of them is (measured in `gptkit recipe preference`: BENCHMARKS.md). sft_weight
adds the chosen answers' negative log-likelihood per token (RPO, Pang et al. 2024; TRL's
loss_type ["sigmoid", "sft"] with loss_weights [1, sft_weight]), which keeps them likely.

The reference is the model before training (or a checkpoint given instead). Its
log-probabilities are computed once, before the first step, and stored with the pairs, so
memory holds one model; a resumed run computes them again from the same weights (the same
numbers). Evaluations log, besides the loss: reward accuracy (the share of pairs where the
policy prefers `chosen` more than the reference does), the mean reward margin, and the
mean chosen and rejected log-probabilities.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.data.records import Mixture, TaskBatches


def sequence_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(rows,) the sum of each row's target log-probabilities (targets of -100 count nothing)."""
    logits = model(x)  # (rows, T, vocab), through the forward that DDP and FSDP wrap
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="none")
    return -nll.view_as(y).sum(dim=-1)


def dpo_terms(logps: torch.Tensor, ref: torch.Tensor, beta: float, sft_weight: float = 0.0,
              chosen_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The DPO loss and its diagnostics from (2B,) log-probabilities: B chosen rows, then B rejected.
    With sft_weight, plus that times the chosen answers' mean negative log-likelihood per token."""
    B = logps.shape[0] // 2
    chosen_reward = beta * (logps[:B] - ref[:B])
    rejected_reward = beta * (logps[B:] - ref[B:])
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    if sft_weight:
        loss = loss + sft_weight * -logps[:B].sum() / chosen_tokens
    return {"loss": loss,
            "reward_accuracy": (margin > 0).float().mean().detach(),
            "reward_margin": margin.mean().detach(),
            "logp_chosen": logps[:B].mean().detach(),
            "logp_rejected": logps[B:].mean().detach()}


class DPOLoss:
    """The trainer's loss function for pair batches (x, y, ref), with a process's share under
    torchrun (see TaskBatches): the loss is a mean over pairs, so each process's mean is
    scaled by its share of the global batch's pairs."""

    def __init__(self, beta: float, sft_weight: float = 0.0):
        self.beta, self.sft_weight = beta, sft_weight

    def __call__(self, model: nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
        share = 1.0
        if isinstance(batch[-1], float):
            *batch, share = batch
        x, y, ref = batch
        chosen_tokens = (y[:y.shape[0] // 2] != -100).sum()
        out = dpo_terms(sequence_logps(model, x, y), ref.to(torch.float32), self.beta, self.sft_weight, chosen_tokens)
        out["loss"] = out["loss"] * share
        return out


@torch.no_grad()
def fill_reference(model: nn.Module, data: TaskBatches | Mixture, amp: contextlib.AbstractContextManager,
                   batch_size: int = 16) -> int:
    """Store the model's log-probabilities of every pair's two answers (train and validation)
    as the pairs' reference; returns the number of pairs scored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = 0
    for task in (data.tasks.values() if isinstance(data, Mixture) else [data]):
        pairs = task.train + task.val
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            x, y = task.pad_rows([p.chosen for p in chunk] + [p.rejected for p in chunk])
            with amp:
                logps = sequence_logps(model, x.to(device), y.to(device)).float().cpu()
            for j, p in enumerate(chunk):
                p.ref = (logps[j].item(), logps[len(chunk) + j].item())
            count += len(chunk)
    model.train(was_training)
    return count
