"""One tokenizer interface with four backends, and the chat template a tokenizer stores
(rendering chat messages with it: gptkit.text.chat).

- BPETokenizer: byte-level BPE trained on your corpus with the `tokenizers` library,
  or GPT-2's vocab.json + merges.txt / a tokenizer.json from a local folder.
- CharTokenizer: one token per character seen in training, UTF-8 bytes for the rest.
- TiktokenTokenizer: a tiktoken BPE file that is present locally.

Every backend round-trips: decode(encode(s)) == s for any Unicode string.
A tokenizer is saved as a folder: tokenizer_meta.json (which backend, special tokens,
chat template) plus the backend's own files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from gptkit.errors import GptkitError
from gptkit.fileio import atomic_write, atomic_write_text

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]  # reserved from the start in every tokenizer we train
META_FILE = "tokenizer_meta.json"


PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


@dataclass
class ChatTemplate:
    """How chat messages become tokens. Stored with the tokenizer so training, chat and serve agree.

    kind "chatml": <|im_start|>{role}\\n{content}<|im_end|>\\n per message; the reply opens with
    <|im_start|>assistant\\n and ends with the <|im_end|> token.
    kind "plain" (for tokenizers without chat tokens, e.g. GPT-2's): "{Role}: {content}\\n" per
    message with the role as text (System, User, Assistant); the reply opens with "Assistant:"
    and ends where the model starts the next role marker (the stop strings in `stop`).
    kind "jinja": an imported model's own template (the Jinja `source` from its
    tokenizer_config.json, rendered sandboxed); a reply ends with the token `end`.
    """

    start: str = IM_START
    end: str = IM_END
    default_system: str = ""
    kind: str = "chatml"
    source: str = ""  # kind "jinja": the template text

    @property
    def stop(self) -> list[str]:
        """Stop strings a reply needs: the next role marker (plain); ChatML ends on a token id."""
        return [f"\n{r}:" for r in PLAIN_ROLES.values()] if self.kind == "plain" else []

    def jinja(self) -> str:
        """The Jinja text of this template, for clients that render chat prompts themselves
        (gptkit itself always renders token by token with render_chat)."""
        if self.kind == "jinja":
            return self.source

        def raw(s: str) -> str:
            return "{% raw %}" + s + "{% endraw %}"
        plain = self.kind == "plain"
        head = (lambda role: f"{PLAIN_ROLES[role]}: ") if plain else (lambda role: f"{self.start}{role}\n")
        end = "\n" if plain else f"{self.end}\n"
        system = ""
        if self.default_system:
            system = ("{% if not (messages | selectattr('role', 'equalto', 'system') | list) %}"
                      + raw(f"{head('system')}{self.default_system}{end}") + "{% endif %}")
        role = "{{ message['role'] | capitalize }}: " if plain else raw(self.start) + "{{ message['role'] }}\n"
        prompt = "Assistant:" if plain else self.start + "assistant\n"
        return (system + "{% for message in messages %}" + role + "{{ message['content'] }}" + raw(end)
                + "{% endfor %}{% if add_generation_prompt %}" + raw(prompt) + "{% endif %}")


class Tokenizer:
    """The interface every backend implements."""

    kind: str = ""
    chat_template: ChatTemplate | None = None

    # --- the backend's part
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, special: bool = True) -> list[int]:
        """special=False: text spelling a special token (`<|im_end|>`) is encoded as plain text,
        so user text can never become a control token (chat message content is encoded so)."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; backends override it where they can use several cores."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a piece of a UTF-8 character for some tokens)."""
        raise NotImplementedError

    def special_id(self, token: str) -> int | None:
        raise NotImplementedError

    def add_special_tokens(self, tokens: list[str]) -> None:
        raise NotImplementedError

    def _save_files(self, folder: Path) -> dict:
        raise NotImplementedError

    # --- shared
    @property
    def eot_id(self) -> int:
        eot = self.special_id(EOT)
        if eot is None:
            raise GptkitError(f"tokenizer has no {EOT} token")
        return eot

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t: i for t in SPECIAL_TOKENS if (i := self.special_id(t)) is not None}

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, **self._save_files(folder)}
        if self.chat_template is not None:
            meta["chat_template"] = asdict(self.chat_template)
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False))


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, tok):  # tok: tokenizers.Tokenizer
        self.tok = tok
        self._byte_decoder = _gpt2_byte_decoder()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise GptkitError(f"vocab_size={vocab_size} must be at least {256 + len(SPECIAL_TOKENS)} "
                              "(256 bytes + special tokens)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # Reserved tokens in the vocabulary are special (GPT-2's <|endoftext|>, as HF does; the chat
        # tokens of a gptkit-trained vocabulary), else "<|im_end|>" in text would be spelled as bytes.
        tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the library's messages are multi-line Rust errors
            raise GptkitError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return (self.tok if special else self._plain()).encode(text, add_special_tokens=False).ids

    def _plain(self):
        """A copy of the backend that encodes special tokens' text as ordinary text."""
        if getattr(self, "_plain_tok", None) is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._plain_tok = HFTokenizer.from_str(self.tok.to_str())
            self._plain_tok.encode_special_tokens = True
        return self._plain_tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            raise GptkitError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        if token_id in self.tok.get_added_tokens_decoder():
            return piece.encode("utf-8")  # special and added tokens are stored as plain text
        return bytes(self._byte_decoder[ch] for ch in piece)

    def special_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def add_special_tokens(self, tokens: list[str]) -> None:
        self.tok.add_special_tokens(tokens)
        self._plain_tok = None

    def _save_files(self, folder: Path) -> dict:
        atomic_write(folder / "tokenizer.json", lambda tmp: self.tok.save(tmp))
        return {}


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters of byte-level BPE back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class CharTokenizer(Tokenizer):
    """Characters seen in training get one id each; any other character is spelled as its
    UTF-8 bytes (256 byte tokens), so every string round-trips."""

    kind = "char"

    def __init__(self, chars: list[str], specials: list[str] | None = None):
        self.specials = list(specials or SPECIAL_TOKENS)
        self.chars = list(chars)
        self._n_fixed = len(self.specials) + 256  # specials, then bytes, then characters
        self._char_to_id = {c: self._n_fixed + i for i, c in enumerate(self.chars)}
        # A "character" longer than one code point is a special token added after training
        # (appended, so existing ids keep their meaning).
        self._special_to_id = {t: i for i, t in enumerate(self.specials)}
        self._special_to_id.update({c: i for c, i in self._char_to_id.items() if len(c) > 1})

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return self._n_fixed + len(self.chars)

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids: list[int] = []
        for piece, is_special in _split_specials(text, list(self._special_to_id) if special else []):
            if is_special:
                ids.append(self._special_to_id[piece])
                continue
            for ch in piece:
                i = self._char_to_id.get(ch)
                if i is None:
                    ids.extend(len(self.specials) + b for b in ch.encode("utf-8"))
                else:
                    ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        n_special = len(self.specials)
        if 0 <= token_id < n_special:
            return self.specials[token_id].encode("utf-8")
        if token_id < self._n_fixed:
            return bytes([token_id - n_special])
        if token_id < self.vocab_size:
            return self.chars[token_id - self._n_fixed].encode("utf-8")
        raise GptkitError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")

    def special_id(self, token: str) -> int | None:
        return self._special_to_id.get(token)

    def add_special_tokens(self, tokens: list[str]) -> None:
        # Specials sit before bytes and characters, and inserting one there would shift every
        # id; instead append it as a multi-character "character" (see __init__).
        for t in tokens:
            if len(t) < 2:
                raise GptkitError(f"special token {t!r} must be at least 2 characters")
            if t not in self._special_to_id and t not in self._char_to_id:
                self.chars.append(t)
                self._char_to_id[t] = self._special_to_id[t] = self.vocab_size - 1

    def _save_files(self, folder: Path) -> dict:
        return {"specials": self.specials, "chars": self.chars}


def _split_specials(text: str, specials: list[str]) -> Iterator[tuple[str, bool]]:
    """Split text into (piece, is_special) runs, longest special token first."""
    i, start = 0, 0
    ordered = sorted(specials, key=len, reverse=True)
    while i < len(text):
        if text[i] == "<":
            hit = next((s for s in ordered if text.startswith(s, i)), None)
            if hit:
                if start < i:
                    yield text[start:i], False
                yield hit, True
                i = start = i + len(hit)
                continue
        i += 1
    if start < len(text):
        yield text[start:], False


# GPT-2's pre-tokenisation pattern, which tiktoken's r50k/gpt2 encodings use.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding read from a local .tiktoken file (no download)."""

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike, pattern: str = GPT2_PATTERN, specials: dict[str, int] | None = None):
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise GptkitError("the tiktoken backend needs `pip install gptkit[tiktoken]`") from None
        path = Path(path)
        if not path.is_file():
            raise GptkitError(f"{path}: tiktoken file not found")
        ranks = load_tiktoken_bpe(str(path))
        if specials is None:
            specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.path, self.pattern, self.specials = path, pattern, dict(specials)
        self.enc = tiktoken.Encoding(name=path.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.specials)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, special: bool = True) -> list[int]:
        if not special:
            return self.enc.encode(text, allowed_special=set(), disallowed_special=())
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def special_id(self, token: str) -> int | None:
        return self.specials.get(token)

    def add_special_tokens(self, tokens: list[str]) -> None:
        for t in tokens:
            if t not in self.specials:
                self.specials[t] = max([self.enc.n_vocab - 1, *self.specials.values()]) + 1
        self.__init__(self.path, self.pattern, self.specials)

    def _save_files(self, folder: Path) -> dict:
        target = folder / "encoding.tiktoken"
        if self.path.resolve() != target.resolve():
            shutil.copyfile(self.path, target)
        return {"pattern": self.pattern, "specials": self.specials}


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by gptkit, or read GPT-2 / tokenizer.json files from a folder (a
    checkpoint's step folder is one; gptkit.checkpoint.open.open_tokenizer resolves run folders)."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if meta_path.is_file():
        try:
            return _load_saved(folder, meta_path)
        except GptkitError:
            raise
        except Exception as e:  # garbage JSON, missing keys, a damaged tokenizer.json: one line, not a traceback
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            raise GptkitError(f"{meta_path}: damaged tokenizer files ({type(e).__name__}: {detail})") from None
    if (folder / "tokenizer.json").is_file():
        return BPETokenizer.from_file(folder / "tokenizer.json")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return BPETokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt")
    tiktoken_files = sorted(folder.glob("*.tiktoken"))
    if tiktoken_files:
        return TiktokenTokenizer(tiktoken_files[0])
    raise GptkitError(f"{folder}: no tokenizer found (expected {META_FILE}, tokenizer.json, "
                      "vocab.json + merges.txt, or a .tiktoken file)")


def _load_saved(folder: Path, meta_path: Path) -> Tokenizer:
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind == "bpe":
        tok: Tokenizer = BPETokenizer.from_file(folder / "tokenizer.json")
    elif kind == "char":
        tok = CharTokenizer(meta["chars"], meta["specials"])
    elif kind == "tiktoken":
        tok = TiktokenTokenizer(folder / "encoding.tiktoken", meta["pattern"], meta["specials"])
    else:
        raise GptkitError(f"{meta_path}: unknown tokenizer kind {kind!r}; expected bpe, char or tiktoken")
    if "chat_template" in meta:
        tok.chat_template = ChatTemplate(**meta["chat_template"])
    return tok
