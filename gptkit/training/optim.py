"""Optimizers the trainer can use beside AdamW: Muon for hidden matrices, and a wrapper that
steps several optimizers as one.

Muon (Jordan et al., 2024, github.com/KellerJordan/Muon) is SGD with Nesterov momentum whose
update is replaced by the nearest semi-orthogonal matrix, found with a few Newton-Schulz
iterations. torch.optim.Muon runs those iterations in bfloat16, which a CPU without bf16
matrix units does ~8x slower than float32 (measured here: 1028 vs 127 ms per Shakespeare
step); this one runs them in float32 on the CPU and in bfloat16 on a GPU. The update is
scaled by 0.2 * sqrt(max(rows, cols)) (Moonshot's "match RMS of AdamW", also torch's
`adjust_lr_fn="match_rms_adamw"`), so the learning rate tuned for AdamW carries over.
"""

from __future__ import annotations

import math

import torch

from gptkit.config import TrainConfig
from gptkit.errors import GptkitError

# Newton-Schulz polynomials x <- a x + b (x x^T) x + c (x x^T)^2 x, one (a, b, c) per iteration, and
# the factor the starting norm is inflated by (so the spectral norm is surely below 1).
NEWTON_SCHULZ = {
    # Keller Jordan's quintic, the same at every iteration: torch.optim.Muon's
    "jordan": (((3.4445, -4.7750, 2.0315),) * 5, 1.0),
    # Polar Express (Amsel, Persson, Musco and Gower, 2025): a polynomial per iteration, computed for 5
    # with a safety factor of 2e-2 (as modded-nanogpt uses it). Its first 3 train the Shakespeare
    # benchmark's model about as well as Jordan's 5, which 3 of Jordan's do not (BENCHMARKS.md).
    "polar-express": (((8.156554524902461, -22.48329292557795, 15.878769915207462),
                       (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                       (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                       (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                       (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)), 1.02),
}


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, ns: str = "jordan") -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (Jordan's 5 steps: singular values land in ~[0.7, 1.2])."""
    coefficients, safety = NEWTON_SCHULZ[ns]
    x = g.bfloat16() if g.is_cuda else g.float()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() * safety).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for a, b, c in coefficients[:steps]:
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-d parameters only; give embeddings, heads, norms and biases to AdamW."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns: str = "jordan"):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, ns=ns))
        if ns not in NEWTON_SCHULZ or not 1 <= ns_steps <= len(NEWTON_SCHULZ[ns][0]):
            raise ValueError(f"Newton-Schulz: {ns_steps} iterations of {ns!r}; expected 1 to 5 of "
                             f"{', '.join(NEWTON_SCHULZ)}")
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-d parameters only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(mu).add_(p.grad)
                update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                ns = group.get("ns", "jordan")  # state saved before the option: Jordan's
                p.add_(orthogonalize(update, group["ns_steps"], ns=ns), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices, AdamW for the rest).

    param_groups lists every group, so the trainer's schedule sets all learning rates; a
    group's `lr_scale` (default 1) multiplies the scheduled value."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


# ---------------------------------------------------------------------------- the trainer's set-up
def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices (Linear and embedding weights) only, not on biases,
    LayerNorm or 1-d parameters; fused kernel where this torch build offers it.
    With cfg.optimizer == "muon", the 2-d weights inside the transformer blocks go to Muon
    instead (embeddings, the head, norms, biases, classification heads and LoRA adapters stay
    with AdamW, as Muon is meant for hidden matrices only)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise GptkitError("no trainable parameters")
    hidden = [p for n, p in named if cfg.optimizer == "muon" and _is_hidden_matrix(n, p)]
    rest = [p for n, p in named if not any(p is h for h in hidden)]
    adamw = _adamw(rest, cfg) if rest else None
    if not hidden:
        return adamw
    muon = Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                ns_steps=cfg.muon_ns_steps, ns=cfg.muon_ns)
    for g in muon.param_groups:
        g["lr_scale"] = cfg.muon_lr_scale
    return Optimizers(*[o for o in (muon, adamw) if o is not None])


def _is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    parts = name.split(".")
    return p.dim() == 2 and parts[0] == "h" and not any(part.startswith("lora") for part in parts)


def _adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
