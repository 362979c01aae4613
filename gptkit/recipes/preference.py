"""`gptkit recipe preference`: what preference tuning adds to imitation, on sums.

The story of GPT-3 -> ChatGPT in miniature. A small model that knows how to add (the
arithmetic recipe's base, pretrained on correct equations) is chat-tuned on demonstrations
written by someone who forgets to carry half the time ("What is 38+45?" -> "73"):
supervised fine-tuning imitates them, mistakes included. Then comparisons, which are easier to
give than demonstrations: for each training sum, the correct answer is preferred to the
demonstrator's kind of mistake (the carry dropped, or one added where nothing carries).
DPO on those pairs, from the chat-tuned model, and measured on held-out sums never seen in any
training: the DPO run's reward accuracy on held-out pairs, and greedy exact match of the
chat-tuned and the DPO model side by side through `gptkit compare` (bootstrap intervals).
"""

from __future__ import annotations

import random
from pathlib import Path

from gptkit.evaluation.compare import CompareConfig, compare
from gptkit.recipes.finetune import Log, Scale, arithmetic_and_docs_base, split, train_cfg, write_jsonl
from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune

FORGET_CARRY = 0.5  # how often the demonstrator drops a carry


def no_carry(a: int, b: int) -> int:
    """a + b added digit by digit with every carry dropped: 38+45 -> 73."""
    out, place = 0, 1
    while a or b:
        out += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def mistake(a: int, b: int) -> int:
    """The near miss a pair rejects: the carry dropped, or a carry added where there is none
    (both directions, so that the pairs teach when to carry, not just to add ten)."""
    wrong = no_carry(a, b)
    return wrong if wrong != a + b else a + b + 10


def question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a}+{b}?"}]


def demonstration(a: int, b: int, rng: random.Random) -> dict:
    answer = a + b if no_carry(a, b) == a + b or rng.random() >= FORGET_CARRY else no_carry(a, b)
    return {"messages": [*question(a, b), {"role": "assistant", "content": str(answer)}]}


def pair(a: int, b: int) -> dict:
    return {"prompt": question(a, b), "chosen": {"role": "assistant", "content": str(a + b)},
            "rejected": {"role": "assistant", "content": str(mistake(a, b))}}


def preference(out: Path, scale: Scale, seed: int, log: Log, **_) -> dict:
    base, (train_pairs, test_pairs), _ = arithmetic_and_docs_base(out, scale, seed, log)
    folder = out / "preference"
    rng = random.Random(seed)
    test_pairs = test_pairs[:scale.test_size]

    # 1. the chat-tuned model: demonstrations with the demonstrator's mistakes
    sft_train, sft_val = split(train_pairs, seed, fraction=0.05)
    sft_spec = DataSpec(write_jsonl(folder / "data" / "sft_train.jsonl", [demonstration(a, b, rng) for a, b in sft_train]),
                        val=write_jsonl(folder / "data" / "sft_val.jsonl", [demonstration(a, b, rng) for a, b in sft_val]),
                        name="sft")
    sft = folder / "sft"
    finetune(base, [sft_spec], train_cfg(sft, scale.pref_sft_steps, scale, seed, 2e-3), log=log)

    # 2. DPO from it on comparisons of the training sums; the held-out sums' pairs are its validation set
    dpo_spec = DataSpec(write_jsonl(folder / "data" / "pairs_train.jsonl", [pair(a, b) for a, b in train_pairs]),
                        val=write_jsonl(folder / "data" / "pairs_test.jsonl", [pair(a, b) for a, b in test_pairs]),
                        name="pairs")
    dpo = folder / "dpo"
    cfg = train_cfg(dpo, scale.pref_steps, scale, seed, scale.pref_lr)
    cfg.eval_batches = -(-len(test_pairs) // cfg.batch_size)  # every held-out pair
    last = finetune(sft, [dpo_spec], cfg, FinetuneConfig(method="dpo", beta=scale.pref_beta, sft_weight=scale.pref_sft_weight), log=log)

    # 3. both models on the held-out questions, side by side
    qa = write_jsonl(folder / "data" / "test_qa.jsonl",
                     [{"messages": [*question(a, b), {"role": "assistant", "content": str(a + b)}]} for a, b in test_pairs])
    report = compare([f"sft={sft}", f"dpo={dpo}"], CompareConfig(tasks=Path(qa), out=folder / "compare", max_tokens=6,
                                                                 speed_rounds=1), log=log)
    em = {m["label"]: m["task"]["exact_match"] for m in report["models"]}
    carries = sum(no_carry(a, b) != a + b for a, b in test_pairs)
    return {"recipe": "preference", "held_out_sums": len(test_pairs), "held_out_with_carry": carries,
            "held_out_reward_accuracy": last["val_reward_accuracy"], "held_out_reward_margin": last["val_reward_margin"],
            "sft_exact_match": em["sft"]["value"], "dpo_exact_match": em["dpo"]["value"],
            "dpo_minus_sft": report["models"][1]["diff"]["exact_match"], "sft_interval": [em["sft"]["lo"], em["sft"]["hi"]],
            "dpo_interval": [em["dpo"]["lo"], em["dpo"]["hi"]], "compare_report": str(folder / "compare" / "report.md")}
