"""A static-shape one-token decode step over the engine's KV cache, captured as a CUDA graph.

On a GPU a small model's decode step is bound by kernel launches, not by the GPU: a hundred
launches per layer from Python take longer than the maths. A CUDA graph replays the whole
step's kernels with one launch, but only a step whose shapes, buffers and control flow never
change can be captured. So this step:

- reads its inputs from static buffers: each row's token (R, 1) and cache position (R,), a
  device tensor copied in from the engine's host-side lengths before each step;
- writes each row's new key and value at its own position with a scatter, and attends over
  the whole preallocated cache length, masked by position (no per-row lengths in Python, no
  branch on the data);
- runs a batch padded up to a bucket (1, 2, 4, 8, ... up to the engine's max_batch): one
  graph per bucket; padded rows are free cache rows, their outputs are ignored and what they
  write is overwritten when a request is admitted there.

On CPU the same step runs eagerly (the engine's default there is the eager path, which attends
only over the cached length: attending over the whole cache would cost speed).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from gptkit.model.gpt import GPT, KVCache


class StaticCache:
    """KVCache's begin/update/end for a one-token step over rows with fixed shapes: k, v
    (n_layer, B, nh, L, hs) are views of the engine's cache, pos (B,) each row's position."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        self.k, self.v, self.pos = k, v, pos
        self._mask: torch.Tensor | None = None

    def begin(self, T: int, device: torch.device) -> torch.Tensor:
        if T != 1:
            raise ValueError(f"the static decode step takes one token per row, got {T}")
        keys = torch.arange(self.k.shape[3], device=device)
        self._mask = (keys[None, :] <= self.pos[:, None])[:, None, None, :]  # (B, 1, 1, L): keys up to the row's own
        return self.pos[:, None]  # (B, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new k, v (B, nh, 1, hs) at each row's position; all keys, values, the mask."""
        B, nh, _, hs = k.shape
        at = self.pos[:, None, None, None].expand(B, nh, 1, hs)  # (B, nh, 1, hs)
        self.k[layer].scatter_(2, at, k)
        self.v[layer].scatter_(2, at, v)
        return self.k[layer], self.v[layer], self._mask

    def end(self, T: int) -> None:
        self._mask = None


def bucket(batch: int, max_batch: int) -> int:
    """The padded batch size for `batch` rows: the next power of two, at most max_batch."""
    return min(1 << (batch - 1).bit_length(), max_batch)


class StaticDecoder:
    """One-token decode steps for the first B rows of a KVCache, padded to a bucket; with
    `graphs` (CUDA only) each bucket's step is captured once and replayed."""

    def __init__(self, model: GPT, cache: KVCache, graphs: bool = False):
        rows, device = cache.k.shape[1], cache.k.device
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the cache is on {device}")
        self.model, self.cache, self.graphs = model, cache, graphs
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # static inputs
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self._steps: dict[int, Callable[[], torch.Tensor]] = {}  # bucket -> step giving logits (b, 1, V)

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        """Feed each of the first len(tokens) rows its next token; their logits (B, V)."""
        B = len(tokens)
        lengths = self.cache.lengths[:B]
        if max(lengths) >= self.cache.max_len:
            raise ValueError(f"KV cache overflow: {max(lengths) + 1} tokens > max_len {self.cache.max_len}")
        self.tokens[:B, 0].copy_(torch.tensor(tokens), non_blocking=True)
        self.pos[:B].copy_(torch.tensor(lengths), non_blocking=True)
        b = bucket(B, len(self.pos))
        if b not in self._steps:
            self._steps[b] = self._capture(b) if self.graphs else lambda: self._forward(b)
        logits = self._steps[b]()
        self.cache.lengths[:B] = [n + 1 for n in lengths]
        return logits[:B, -1]

    def _forward(self, b: int) -> torch.Tensor:
        view = StaticCache(self.cache.k[:, :b], self.cache.v[:, :b], self.pos[:b])
        return self.model(self.tokens[:b], kv_cache=view, last_only=True)  # (b, 1, V)

    def _capture(self, b: int) -> Callable[[], torch.Tensor]:
        """Capture bucket b's step as a CUDA graph; its replay returns the same output buffer
        each time (read it before the next step). Warm-up runs write what the step itself
        writes (the same tokens at the same positions), so they change no state."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, workspaces) off the graph
                for _ in range(2):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # each graph its own memory pool: buckets replay in any order, and a decode step's
            # activations are small (the largest, the logits, is b x vocab)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._forward(b)
        except Exception as e:  # e.g. an op that cannot be captured: decode eagerly rather than not at all
            warnings.warn(f"CUDA graph capture failed for batch {b}, this bucket runs eagerly: {e}")
            return lambda: self._forward(b)

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay
