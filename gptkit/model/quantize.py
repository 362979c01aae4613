"""Weight formats for fast CPU decoding: int8 weight-only quantisation and prepacked bf16.

Decoding one token at a time reads every weight once per step, so its speed is set by
memory bandwidth: int8 weights are a quarter of fp32's bytes. Each output channel of a
Linear gets its own scale (max |w| / 127, symmetric, round to nearest); activations stay in
floating point, so the only error is the weight rounding (about 0.2% of a channel's range).

bf16 weights, and fp32 weights of an engine that batches, are prepacked into oneDNN's blocked
layout: the same numbers, but decoding's skinny products read them faster than from the plain
layout (measured on a 2-core AVX-512 Xeon: bf16 at batch 1 about 1.4x; fp32 at batch 8 1.5-2.4x).
An fp32 engine of one row (`generate`, `chat`) keeps the plain layout: there MKL's matrix-vector
product reads 24-31 GB/s where oneDNN's reads 19-22 (fp32 GPT-2 124M: 21 vs 28 ms of matmuls per
token).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.errors import GptkitError

METHODS = ("int8",)
PACK_BATCH_HINT = 8


class Int8Linear(nn.Module):
    """y = x W^T * scale + b, with W int8 (out, in) and one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        # The CPU kernel computes in bf16 (AVX-512-BF16); fp32 activations take a slow path.
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        scales = self.scales.to(torch.bfloat16)  # a no-op unless model.to(dtype) converted the buffer
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, scales)
        else:  # dequantise on the fly: on GPUs, and where the CPU kernel's blocks do not tile the input
            # (in_features % 16 != 0: it returns garbage or crashes, measured with torch 2.13)
            y = F.linear(x2, self.weight.to(torch.bfloat16)) * scales
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is prepacked for oneDNN (CPU only, inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_BATCH_HINT)  # opaque layout
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace every nn.Linear (attention, MLP and the LM head) by its int8 version, in place.
    The token embedding stays in floating point: a lookup reads one row, not the matrix."""
    if method not in METHODS:
        raise GptkitError(f"quantize={method!r}: expected one of {', '.join(METHODS)}")
    return _replace_linears(model, Int8Linear)


def pack_linears(model: nn.Module) -> nn.Module:
    """Prepack every nn.Linear for oneDNN, in place (a no-op where oneDNN is missing or cannot
    pack this dtype on this CPU: its bf16 layout needs AVX-512 or AVX-NE-CONVERT)."""
    dtype = next((m.weight.dtype for m in model.modules() if type(m) is nn.Linear), None)
    if dtype is None or not _can_pack(dtype):
        return model
    return _replace_linears(model, PackedLinear)


_packable: dict[torch.dtype, bool] = {}


def _can_pack(dtype: torch.dtype) -> bool:
    if dtype not in _packable:
        try:
            PackedLinear(nn.Linear(16, 16, dtype=dtype))(torch.zeros(1, 16, dtype=dtype))
            _packable[dtype] = torch.backends.mkldnn.is_available()
        except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
            _packable[dtype] = False
    return _packable[dtype]


def _replace_linears(model: nn.Module, make) -> nn.Module:
    # plain Linears only: a subclass (a LoRA layer) computes more than its weight, and replacing it
    # would silently drop that part
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(linear))
    return model


# ------------------------------------------------------------------------------------ model set-up
def prepare_model(model: nn.Module, *, device=None, dtype: torch.dtype | None = None,
                  quantize: str | None = None, max_batch: int = 8) -> nn.Module:
    """Put the model in eval mode on device/dtype (in place: no second copy of the weights),
    optionally with int8 weight-only linear layers; on CPU, bf16 linear weights and the fp32
    ones of an engine of more than one row are prepacked for oneDNN."""
    model.eval()
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if quantize is not None:
        quantize_model(model, quantize)
    elif on_cpu and (model.lm_head.weight.dtype == torch.bfloat16
                     or (model.lm_head.weight.dtype == torch.float32 and max_batch > 1)):
        pack_linears(model)
    return model
