"""Moderation against rewrites made to slip past it: detection before and after, in one run.

A small moderation classifier is trained here the README's way (sentences from
gptkit.recipes.moderation_data -> `finetune --task classify`), with a blocklist of the data's
insults. Held-out sentences (another seed, so other fills of the templates) are rewritten as an
attacker would: a benign sentence appended or prepended, Chinese and English mixed, and for the
blocklist plurals, s p a c e d letters, leetspeak, Cyrillic look-alikes, zero-width characters,
full-width letters and spaces between Chinese characters. Each set is scored by

    before  the classifier at each context window's last token; the blocklist on the raw text
    after   gptkit's moderation now: the classifier also on each sentence and clause alone, the
            worst score per category; the blocklist on the normalised text (gptkit.server.moderation)

and the share flagged is reported, with the false-positive rate on held-out benign sentences
(plain and with the same suffixes) at the same threshold.

    python benchmarks/moderation_adversarial.py [--n 600] [--steps 300] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
from pathlib import Path

import torch

from gptkit.checkpoint.format import save_checkpoint
from gptkit.checkpoint.open import open_checkpoint
from gptkit.config import ModelConfig, TrainConfig
from gptkit.model.gpt import GPT
from gptkit.recipes import moderation_data as md
from gptkit.server.moderation import _term_pattern, blocklist_forms, class_probs
from gptkit.text.tokenizer import EOT, CharTokenizer
from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune

SUFFIXES = [" thanks!", ", have a nice day", ". see you at the meeting", " lol", "，谢谢"]
PREFIXES = ["hello! ", "thanks for the lunch. ", "ok, "]
TERMS = md._SLOTS["noun"] + md._SLOTS["znoun"]  # the insults, English and Chinese
# the blocklist as it matched before: the raw text, whole ASCII words, any case, no plurals
OLD_PATTERN = re.compile("|".join(rf"(?<![A-Za-z0-9_]){re.escape(t)}(?![A-Za-z0-9_])" if t.isascii() else re.escape(t)
                                  for t in TERMS), re.IGNORECASE)


def train_classifier(folder: Path, n: int, steps: int) -> Path:
    data = md.write(folder / "moderation.jsonl", n, seed=0)
    extra = "".join(SUFFIXES + PREFIXES) + "abcdefghijklmnopqrstuvwxyz0123456789 .,!?"
    tok = CharTokenizer(sorted(set(data.read_text(encoding="utf-8")) | set(extra)), [EOT])
    torch.manual_seed(0)
    save_checkpoint(folder / "base", GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2,
                                                     n_embd=64)), tok)
    cfg = TrainConfig(out_dir=str(folder / "cls"), max_steps=steps, batch_size=32, lr=3e-3, warmup_steps=10,
                      optimizer="adamw", eval_interval=steps, eval_batches=2, log_interval=steps, progress=False)
    finetune(folder / "base", [DataSpec(str(data))], cfg, FinetuneConfig(task="classify"), log=lambda m: None)
    return folder / "cls"


def spaced(t: str) -> str:
    return re.sub(r"\b(" + "|".join(md._SLOTS["noun"]) + r")\b", lambda m: " ".join(m.group()), t)


def rewrites(rng: random.Random) -> dict:
    """name -> function of a flagged text; None where the rewrite does not apply to the text."""
    def insult(f):  # rewrite the English insult word of a text (harassment sentences hold one)
        def apply(t):
            w = next((w for w in md._SLOTS["noun"] if re.search(rf"\b{w}\b", t)), None)
            return re.sub(rf"\b{w}\b", f(w), t) if w else None
        return apply

    def zh_spaced(t):  # 笨蛋 -> 笨 蛋
        w = next((w for w in md._SLOTS["znoun"] if w in t), None)
        return t.replace(w, " ".join(w)) if w else None
    return {
        "as written": lambda t: t,
        "+ benign suffix": lambda t: t + rng.choice(SUFFIXES),
        "+ benign prefix": lambda t: rng.choice(PREFIXES) + t,
        "plural insult": insult(lambda w: w + "s"),
        "s p a c e d": insult(lambda w: " ".join(w)),
        "leetspeak (i->1, o->0)": insult(lambda w: w.replace("i", "1").replace("o", "0")),
        "Cyrillic look-alikes": insult(lambda w: w.replace("o", "о").replace("i", "і").replace("e", "е")),
        "zero-width inside": insult(lambda w: w[:2] + "\u200b" + w[2:]),
        "full-width letters": insult(lambda w: "".join(chr(ord(c) + 0xFEE0) for c in w)),
        "Chinese insult spaced (笨 蛋)": zh_spaced,
    }


def flagged(texts: list[str], model, tok, labels, pattern, threshold: float, after: bool) -> tuple[float, float]:
    """(share flagged by the moderator, share flagged by its blocklist alone)."""
    hits = blocked_hits = 0
    for t in texts:
        probs = class_probs(model, tok, labels, t, by_clause=after)
        by_model = any(p >= threshold for lb, p in probs.items() if lb != "ok")
        blocked = any(pattern.search(f) for f in blocklist_forms(t)) if after else bool(OLD_PATTERN.search(t))
        hits += by_model or blocked
        blocked_hits += blocked
    return hits / len(texts), blocked_hits / len(texts)


def _row(name: str, texts: list[str], model, tok, labels, pattern, threshold: float) -> dict:
    (before, block_before), (after, block_after) = (flagged(texts, model, tok, labels, pattern, threshold, a)
                                                    for a in (False, True))
    return {"set": name, "texts": len(texts), "before": before, "after": after, "blocklist_before": block_before,
            "blocklist_after": block_after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--held-out", type=int, default=300)
    p.add_argument("--threshold", type=float, default=0.5)
    args = p.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = open_checkpoint(train_classifier(Path(tmp), args.n, args.steps))
    model, tok, labels = loaded.model.eval(), loaded.tokenizer, loaded.meta.labels
    pattern = re.compile("|".join(_term_pattern(t) for t in TERMS))  # as gptkit's Moderator builds it now
    held = md.examples(args.held_out, seed=99)
    bad = [r["text"] for r in held if r["label"] != "ok"]
    good = [r["text"] for r in held if r["label"] == "ok"]
    rows = []
    for name, rewrite in rewrites(rng).items():
        texts = [x for x in map(rewrite, bad) if x is not None]
        rows.append(_row(f"flagged, {name}", texts, model, tok, labels, pattern, args.threshold))
    for name, texts in (("benign, as written", good), ("benign + suffix", [t + rng.choice(SUFFIXES) for t in good])):
        rows.append(_row(f"{name} (false positives)", texts, model, tok, labels, pattern, args.threshold))
    print(f"{'set':<46} {'texts':>5} {'before':>7} {'after':>7} {'blocklist alone: before':>24} {'after':>6}")
    for r in rows:
        print(f"{r['set']:<46} {r['texts']:>5} {r['before']:>7.1%} {r['after']:>7.1%} {r['blocklist_before']:>24.1%} "
              f"{r['blocklist_after']:>6.1%}")
    print(json.dumps({"rows": rows, "threshold": args.threshold, "n": args.n, "steps": args.steps}))


if __name__ == "__main__":
    main()
