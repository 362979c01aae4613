"""Token shards: written by `gptkit prepare`, read as batches by the trainer.

`ShardWriter` appends a split's token ids to OUT/{split}_00000.bin, ... in `token_dtype`.
`TokenShards` reads what `gptkit prepare` wrote (OUT/meta.json + token shards) and draws
random windows of block_size + 1 tokens. It is DDP-aware and resumable: every process
draws the same *global* batch from one seeded generator and keeps its own slice, so
2 processes x batch B see exactly the samples of 1 process x batch 2B, and the
generator's state is saved in checkpoints so a resumed run continues the same sequence.

Every batch source offers the same small interface to the trainer:
    train_batch() -> batch            (a tuple of tensors the loss function understands)
    val_sets() -> {name: [batch, ...]}  (fixed batches, so evaluations are comparable)
    state_dict() / load_state_dict()
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from gptkit.errors import GptkitError


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise GptkitError(f"{data_dir}: no meta.json; create the folder with `gptkit prepare`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def split_shards(data_dir: str | Path, split: str) -> tuple[dict, list[np.ndarray]]:
    """meta.json and the memory-mapped token shards of one split ("train" or "val")."""
    meta = read_meta(data_dir)
    return meta, TokenShards._open(Path(data_dir), meta, split)


class TokenShards:
    def __init__(self, train: list[np.ndarray], val: list[np.ndarray], block_size: int, batch_size: int, *,
                 seed: int = 1337, eval_batches: int = 20, rank: int = 0, world_size: int = 1,
                 bytes_per_token: float | None = None, name: str = "data"):
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.eval_batches = eval_batches
        self._bytes_per_token = bytes_per_token
        self.train = self._usable(train, "train", name)
        self.val = self._usable(val, "val", name)
        self.generator = torch.Generator().manual_seed(seed)
        self._val_cache: list | None = None

    @classmethod
    def from_dir(cls, data_dir: str | Path, block_size: int, batch_size: int, **kw) -> "TokenShards":
        """Memory-map the shards that `gptkit prepare` wrote."""
        data_dir = Path(data_dir)
        meta = read_meta(data_dir)
        splits = {split: cls._open(data_dir, meta, split) for split in ("train", "val")}
        val = meta["splits"]["val"]
        text_bytes = meta.get("text_bytes", {}).get("val")
        bpt = text_bytes / val["tokens"] if text_bytes and val["tokens"] else None
        return cls(splits["train"], splits["val"], block_size, batch_size, bytes_per_token=bpt,
                   name=str(data_dir), **kw)

    @staticmethod
    def _open(data_dir: Path, meta: dict, split: str) -> list[np.memmap]:
        dtype = np.dtype(meta["dtype"])
        shards = []
        for name in meta["splits"][split]["shards"]:
            path = data_dir / name
            if not path.is_file():
                raise GptkitError(f"{path}: shard listed in meta.json is missing")
            if path.stat().st_size:
                shards.append(np.memmap(path, dtype=dtype, mode="r"))
        return shards

    def _usable(self, shards: list[np.ndarray], split: str, name: str) -> list[np.ndarray]:
        usable = [s for s in shards if len(s) > self.block_size + 1]
        if not usable:
            total = sum(len(s) for s in shards)
            raise GptkitError(f"{name}: the {split} split has {total} tokens, too few for "
                              f"block_size {self.block_size}; use more text or a smaller --block-size")
        return usable

    def _draw(self, shards: list[np.memmap], n: int, generator: torch.Generator) -> torch.Tensor:
        """n windows of block_size + 1 tokens, uniformly over all shards: (n, T + 1) int64."""
        T = self.block_size
        starts = np.cumsum([0] + [len(s) - T - 1 for s in shards])
        offsets = torch.randint(int(starts[-1]), (n,), generator=generator).numpy()
        which = np.searchsorted(starts, offsets, side="right") - 1
        rows = [shards[w][o - starts[w]: o - starts[w] + T + 1] for w, o in zip(which, offsets)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def _split(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mine = windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()  # inputs, next-token targets

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self._draw(self.train, self.batch_size * self.world_size, self.generator))

    def val_sets(self) -> dict[str, list]:
        if self._val_cache is None:  # the same batches at every evaluation
            g = torch.Generator().manual_seed(0)
            n = self.batch_size * self.world_size
            self._val_cache = [self._split(self._draw(self.val, n, g)) for _ in range(self.eval_batches)]
        return {"val": self._val_cache}

    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes of validation text per token, to turn loss into bits per byte."""
        return self._bytes_per_token

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------------------- writing (gptkit prepare)
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class ShardWriter:
    """Appends token ids to OUT/{split}_00000.bin, ... of at most shard_tokens each; a shard
    is written under a temporary name and renamed when complete."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.tokens = 0
        self._file = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                self._file = open(self.out / f".{self._name()}.tmp", "wb")
            n = min(len(ids), self.shard_tokens - self._in_shard)
            ids[:n].astype(self.dtype).tofile(self._file)
            ids, self._in_shard, self.tokens = ids[n:], self._in_shard + n, self.tokens + n
            if self._in_shard == self.shard_tokens:
                self._finish()

    def close(self) -> list[str]:
        if self._file is not None:
            self._finish()
        return self.shards

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):05d}.bin"

    def _finish(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out / f".{self._name()}.tmp", self.out / self._name())
        self.shards.append(self._name())
        self._file, self._in_shard = None, 0
