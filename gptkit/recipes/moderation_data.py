"""A small labelled moderation set that gptkit writes itself, no downloads: short English and
Chinese sentences, labelled `ok`, `harassment` or `violence`, from templates. Enough to show
the whole path (generate -> `gptkit finetune --task classify` -> `gptkit serve --moderation`),
not a real safety classifier.

    python -m gptkit.recipes.moderation_data --out moderation.jsonl --n 600
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# templates per label and language; each {slot} is filled from its list in _SLOTS at random
_EN = {
    "ok": [
        "the {adj} {thing} is in the {place}",
        "can you help me {task} {when}?",
        "thank you for {favor}, that was {nice}",
        "I {like} {food} for dinner {when}",
        "please {task} before the meeting",
        "{greeting}",
        "the answer is {num}",
        "{greeting}, how are you {when}?",
        # code and docs, what a code model writes: the benign traffic a moderator must pass
        "import {module}\n",
        "def {fn}({arg}):\n    return {arg}",
        "    if {arg} is None:\n        return self.{arg}",
        "for {arg} in {module}.{fn}({arg}):",
        "Return the {arg} of the {thing}.",
    ],
    "harassment": [
        "you are a {insult} {noun}",
        "nobody likes you, you {insult} {noun}",
        "shut up, you {insult} {noun}",
        "go away, {noun}, you are so {insult}",
        "what a {insult} {noun} you are",
    ],
    "violence": [
        "I will {verb} you {when}",
        "I am going to {verb} your {target} {when}",
        "I will {verb} you and your {target}",
        "someone should {verb} your {target}",
        "I want to {verb} everyone in the {place}",
    ],
}
_ZH = {
    "ok": ["今天天气很{zadj}", "请帮我{ztask}", "谢谢你的{zfavor}", "我们{zwhen}去{zplace}吧"],
    "harassment": ["你这个{zinsult}的{znoun}", "闭嘴，你这个{znoun}", "没有人喜欢你，{znoun}",
                   "你真是个{zinsult}的{znoun}"],
    "violence": ["我要{zverb}你", "我{zwhen}要{zverb}你的{ztarget}", "等着我来{zverb}你",
                 "我想{zverb}{zplace}里的每个人"],
}
_SLOTS = {
    "adj": ["red", "old", "new", "small", "heavy", "blue"], "thing": ["book", "chair", "lamp", "bag", "cup", "key"],
    "place": ["kitchen", "office", "garden", "library", "station", "park"],
    "task": ["fix the printer", "write a report", "find the keys", "plan the trip", "cook rice", "read the map"],
    "when": ["today", "tomorrow", "tonight", "after lunch", "next week", "this morning"],
    "favor": ["the gift", "your help", "the ride", "the advice", "lunch", "the book"],
    "nice": ["kind", "great", "lovely", "helpful", "thoughtful"], "like": ["want", "love", "like", "cook"],
    "food": ["noodles", "soup", "fish", "salad", "rice", "bread"],
    "insult": ["stupid", "worthless", "pathetic", "useless", "disgusting", "ugly"],
    "noun": ["idiot", "loser", "clown", "fool", "moron", "creep"],
    "verb": ["hurt", "punch", "beat", "kill", "stab", "attack"],
    "target": ["family", "dog", "friends", "car", "brother", "house"],
    "greeting": ["hello", "hi there", "thanks", "thank you", "good morning", "fine", "ok", "yes", "see you"],
    "num": ["4", "12", "yes", "no", "in the book", "the blue one"],
    "module": ["os", "sys", "json", "re", "shutil", "pathlib"], "fn": ["read", "load", "get_name", "parse", "kill"],
    "arg": ["path", "name", "data", "line", "value", "self"],
    "zadj": ["好", "热", "冷", "晴朗"], "ztask": ["修打印机", "写报告", "找钥匙", "订机票", "做饭"],
    "zfavor": ["礼物", "帮助", "建议", "午饭"], "zwhen": ["今天", "明天", "晚上", "下周"],
    "zplace": ["公园", "图书馆", "车站", "办公室"], "zinsult": ["愚蠢", "没用", "可悲", "恶心"],
    "znoun": ["白痴", "废物", "蠢货", "笨蛋"], "zverb": ["打", "杀", "揍", "伤害"], "ztarget": ["家人", "狗", "朋友", "车"],
}
LABELS = ("ok", "harassment", "violence")


def sentence(rng: random.Random, label: str, chinese: bool) -> str:
    template = rng.choice((_ZH if chinese else _EN)[label])
    text = template.format(**{k: rng.choice(v) for k, v in _SLOTS.items()})
    if not chinese and text[0].islower() and " " in text and rng.random() < 0.5:  # people write either way
        text = text[0].upper() + text[1:] + rng.choice(["", ".", "!"])
    return text


# how a second, benign sentence joins the first in a longer message
_JOINERS = [" ", " ", ", ", ". ", "! ", " - ", "\n", "，", "。"]


def with_context(rng: random.Random, text: str, chinese_share: float) -> str:
    """`text` with a benign sentence of its own before or after it: records whose label holds for the
    whole message, wherever in it the harm is (for a classifier that reads only a text's end)."""
    other = sentence(rng, "ok", rng.random() < chinese_share)
    joiner = rng.choice(_JOINERS)
    return other + joiner + text if rng.random() < 0.5 else text + joiner + other


def examples(n: int, seed: int = 0, chinese_share: float = 0.3, context_share: float = 0.0) -> list[dict]:
    """n records {"text", "label"}, the labels in turn (balanced), a share of them in Chinese, and
    about a `context_share` of them set inside a longer message with a benign sentence (the label
    unchanged). Off by default: measured in benchmarks/moderation_adversarial.py, such records help a
    classifier read at the text's end only, and add false positives once clauses are scored alone."""
    rng, context_rng = random.Random(seed), random.Random(seed + 7919)  # lone sentences as without context
    records = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        text = sentence(rng, label, rng.random() < chinese_share)
        # benign messages get context twice as often as flagged ones: length alone must not signal harm
        if context_rng.random() < context_share * (1.5 if label == "ok" else 0.75):
            text = with_context(context_rng, text, chinese_share)
        records.append({"text": text, "label": label})
    return records


def write(path: str | Path, n: int, seed: int = 0, context_share: float = 0.0) -> Path:
    path = Path(path)
    records = examples(n, seed, context_share=context_share)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--n", type=int, default=600, help="records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-share", type=float, default=0.0,
                   help="share of records set inside a longer message with a benign sentence")
    args = p.parse_args()
    write(args.out, args.n, args.seed, args.context_share)
    print(f"wrote {args.n} records ({', '.join(LABELS)}) to {args.out}")


if __name__ == "__main__":
    main()
