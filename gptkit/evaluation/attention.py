"""Attention maps: which earlier tokens each token attends to, per layer and head.

The weights come from `GPT.attention_maps`, an inspection pass through the same blocks as
the forward (tested to give its logits), with softmax(QK^T/sqrt(d)) written out. This module
turns them into token labels, a PNG (a grid of one layer's heads, or one head large) and
JSON; `gptkit attention` and the server's /v1/attention both use it.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptkit.checkpoint.open import open_checkpoint
from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write_text
from gptkit.model.gpt import GPT
from gptkit.text.tokenizer import Tokenizer

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥"})
CJK_HINT = "no CJK font found, so Chinese tokens show as boxes; install one, e.g. `apt-get install fonts-noto-cjk`"


@dataclass
class AttentionMaps:
    text: str
    token_ids: list[int]
    tokens: list[str]  # one readable label per token (see token_labels)
    weights: np.ndarray  # (n_layer, n_head, T, T): row i is token i's attention over tokens 0..i
    truncated: bool = False  # the text was longer than the context: only its first (or last) tokens are here
    marked: tuple[int, int] | None = None  # rows [start, end) to point out: a reply within its conversation

    @property
    def n_layer(self) -> int:
        return self.weights.shape[0]

    @property
    def n_head(self) -> int:
        return self.weights.shape[1]

    def check(self, layer: int | None, head: int | None = None) -> int:
        """The layer to show (default: the last); a one-line error for an index out of range."""
        layer = self.n_layer - 1 if layer is None else layer
        if not 0 <= layer < self.n_layer:
            raise GptkitError(f"layer {layer}: the model has layers 0..{self.n_layer - 1}")
        if head is not None and not 0 <= head < self.n_head:
            raise GptkitError(f"head {head}: the model has heads 0..{self.n_head - 1}")
        return layer

    def to_json(self, layer: int | None = None, decimals: int = 4) -> dict:
        """All layers, or one: weights nested [layer][head][query][key] (or [head][query][key])."""
        w = self.weights if layer is None else self.weights[layer]
        return {"text": self.text, "tokens": self.tokens, "token_ids": self.token_ids,
                "n_layer": self.n_layer, "n_head": self.n_head, "layer": layer, "truncated": self.truncated,
                "marked": list(self.marked) if self.marked else None,
                "weights": np.round(w.astype(np.float64), decimals).tolist()}


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """A label per token: the characters its bytes belong to, with whitespace made visible. A
    character split over several byte-level tokens labels each piece with its number: 梦¹ 梦² 梦³."""
    spans, data = [], b""
    for t in ids:
        piece = tokenizer.token_bytes(t)
        spans.append((len(data), len(data) + len(piece)))
        data += piece
    text = data.decode("utf-8", errors="replace")
    chars = []  # (char, byte start, byte end)
    pos = 0
    for ch in text:
        n = len(ch.encode("utf-8")) if ch != "\ufffd" else 1
        chars.append((ch, pos, pos + n))
        pos += n
    labels = []
    for t, (a, b) in enumerate(spans):
        label = ""
        for ch, s, e in chars:
            if s < b and e > a:  # the token holds (part of) this character
                pieces = [i for i, (x, y) in enumerate(spans) if x < e and y > s]
                piece = str(pieces.index(t) + 1).translate(SUPERSCRIPT) if len(pieces) > 1 else ""
                label += ch.translate(VISIBLE) + piece
        labels.append(label or "∅")
    return labels


def attention_maps(model: GPT, tokenizer: Tokenizer, text: str, max_tokens: int | None = None) -> AttentionMaps:
    """Run `text` through the model's inspection pass; a text longer than the context (or
    max_tokens) keeps its first tokens."""
    ids = tokenizer.encode(text)
    if not ids:
        raise GptkitError("the text is empty: nothing to attend to")
    context = min(model.config.block_size, max_tokens or model.config.block_size)
    return _maps(model, tokenizer, text, ids[:context], len(ids) > context)


def reply_attention_maps(model: GPT, tokenizer: Tokenizer, ids: list[int], reply: tuple[int, int],
                         max_tokens: int | None = None) -> AttentionMaps:
    """The maps of a whole conversation (token ids) with its reply's rows, ids[reply[0]:reply[1]],
    marked. Longer than the context (or max_tokens): the last tokens are kept, where the reply is."""
    context = min(model.config.block_size, max_tokens or model.config.block_size)
    cut = max(0, len(ids) - context)
    kept = ids[cut:]
    maps = _maps(model, tokenizer, tokenizer.decode(kept), kept, cut > 0)
    maps.marked = (max(0, reply[0] - cut), reply[1] - cut)
    return maps


@torch.inference_mode()
def _maps(model: GPT, tokenizer: Tokenizer, text: str, ids: list[int], truncated: bool) -> AttentionMaps:
    device = next(model.parameters()).device
    _, maps = model.attention_maps(torch.tensor([ids], device=device))  # (n_layer, 1, nh, T, T)
    return AttentionMaps(text, ids, token_labels(tokenizer, ids), maps[:, 0].float().cpu().numpy(), truncated)


# ------------------------------------------------------------------------------------ drawing
def cjk_font() -> str | None:
    """The family name of an installed CJK font, registered with matplotlib (whose font cache
    may predate the font's installation); None when there is none."""
    from matplotlib import font_manager

    def known() -> str | None:
        return next((f.name for f in font_manager.fontManager.ttflist if "CJK" in f.name), None)

    if known() is None:
        for path in font_manager.findSystemFonts():
            if "CJK" in Path(path).name:
                font_manager.fontManager.addfont(path)
    return known()


def needs_cjk(labels: list[str]) -> bool:
    return any("\u2e80" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\uff00" <= ch <= "\uffef"
               for label in labels for ch in label)


def plot(maps: AttentionMaps, out: str | Path, layer: int | None = None, head: int | None = None) -> Path:
    """A PNG of one layer's heads side by side, or of one head large, axes labelled with tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = maps.check(layer, head)
    family = ["DejaVu Sans"]
    if needs_cjk(maps.tokens):
        cjk = cjk_font()
        if cjk is None:
            print(CJK_HINT, file=sys.stderr)
        else:
            family.append(cjk)  # matplotlib falls back glyph by glyph through this list
    heads = [head] if head is not None else list(range(maps.n_head))
    cols = min(len(heads), 4)
    rows = -(-len(heads) // cols)
    T = len(maps.tokens)
    cell = 0.22 if head is None else 0.42  # inches per token
    side = max(3.5, T * cell + 1.2)
    fontsize = 9 if head is not None else 7
    with plt.rc_context({"font.family": family}):
        fig, axes = plt.subplots(rows, cols, figsize=(cols * side + 1, rows * side + 0.5), squeeze=False,
                                 layout="constrained")
        for ax in axes.flat[len(heads):]:
            ax.axis("off")
        future = np.triu(np.ones((T, T), dtype=bool), 1)  # keys after the query: masked, not weight 0
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
        for ax, h in zip(axes.flat, heads):
            image = ax.imshow(np.ma.masked_array(maps.weights[layer, h], future), cmap=cmap, vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {h}", fontsize=fontsize + 1)
            upright = max(len(t) for t in maps.tokens) <= 2  # single characters read best unrotated
            ax.set_xticks(range(T), maps.tokens, rotation=0 if upright else 90, fontsize=fontsize)
            ax.set_yticks(range(T), maps.tokens, fontsize=fontsize)
            ax.set_xlabel("attends to (key)", fontsize=fontsize)
            ax.set_ylabel("token (query)", fontsize=fontsize)
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
        preview = maps.text if len(maps.text) <= 40 else maps.text[:40] + "…"
        fig.suptitle(f"attention over {T} tokens of {preview!r}" + (" (cut to the context)" if maps.truncated else "")
                     + "; blank: later tokens, masked", fontsize=fontsize + 2)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # without a CJK font: the one-line hint, not a warning per glyph
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
    return out


# ------------------------------------------------------------------------------------ command
def run(ckpt: str | Path, text: str, out: str | Path = "attention.png", layer: int | None = None,
        head: int | None = None, json_out: str | Path | None = None) -> str:
    """`gptkit attention`: load, inspect, draw (and write JSON); returns a one-line summary."""
    loaded = open_checkpoint(ckpt)
    maps = attention_maps(loaded.model.eval(), loaded.tokenizer, text)
    layer = maps.check(layer, head)
    png = plot(maps, out, layer, head)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(maps.to_json(), ensure_ascii=False))
    shown = f"head {head}" if head is not None else f"{maps.n_head} heads"
    note = f" (first {len(maps.token_ids)} tokens: the text is longer than the context)" if maps.truncated else ""
    return (f"{len(maps.token_ids)} tokens {' '.join(maps.tokens)}{note}; layer {layer}, {shown} -> {png}"
            + (f"; all {maps.n_layer} layers' weights -> {json_out}" if json_out is not None else ""))
