"""Model surgery for fine-tuning, in one place: vocabulary growth for the chat tokens and the
classification head with its logits.

A classification head is a Linear on the hidden state of each row's last real token, stored as
`model.heads["classify"]` (saved under `heads.classify.` with `extra.heads` in the checkpoint,
see gptkit.checkpoint.format) with its labels in `extra.labels`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


CLASSIFY_HEAD = "classify"


def attach_heads(model: nn.Module, heads: dict[str, list[int]]) -> None:
    """Add Linear heads (in_features, out_features) as model.heads[name]; their weights load
    and save under `heads.<name>.` like every other tensor."""
    if heads:
        model.heads = torch.nn.ModuleDict({name: torch.nn.Linear(*shape) for name, shape in heads.items()})


def class_logits(model: nn.Module, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Classification logits (B, n_labels) from the hidden state of each row's last real token."""
    return model(x, head=CLASSIFY_HEAD, last=last)


@torch.no_grad()
def resize_vocab(model: nn.Module, vocab_size: int) -> None:
    """Grow wte to vocab_size rows (new rows = the mean embedding, a neutral start); a tied LM
    head stays tied, an untied one grows the same way."""
    old, old_head = model.wte.weight, model.lm_head.weight
    wte = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    wte.weight[:old.shape[0]] = old
    wte.weight[old.shape[0]:] = old.mean(dim=0)
    model.wte = wte
    model.lm_head = nn.Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    else:
        model.lm_head.weight[:old_head.shape[0]] = old_head
        model.lm_head.weight[old_head.shape[0]:] = old_head.mean(dim=0)
    model.config.vocab_size = vocab_size


def add_class_head(model: nn.Module, n_labels: int) -> None:
    attach_heads(model, {CLASSIFY_HEAD: [model.config.n_embd, n_labels]})
    head = model.heads[CLASSIFY_HEAD].to(model.wte.weight.device)
    nn.init.normal_(head.weight, std=0.02)  # as every other Linear (GPT.init_weights)
    nn.init.zeros_(head.bias)
