"""`make demo` with GPT-2's choices and with the later decoders', side by side in one run.

Each configuration runs the whole demo (tokenizer, prepare, a timed pilot, pretraining by time,
the quiz, samples) under the same time budget, so the one that is dearer per step gets fewer
steps: what is compared is what each learns in the demo's minutes on this machine. Rounds are
interleaved (gpt2, modern, gpt2, modern, ...). The last line is one JSON object.

    python benchmarks/demo_archs.py [--minutes 5] [--rounds 1] [--archs gpt2,modern]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile

from gptkit.recipes.demo import DemoConfig, run_demo

# the demo's shape; "modern": rotary positions, RMSNorm, QK-norm, ReLU² MLP, untied head, no biases
# (the choices measured beside nanoGPT in benchmarks/train_vs_nanogpt.py)
MODERN = dict(pos_encoding="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False, bias=False)
# "llama": the same with Llama's SwiGLU MLP (hidden 8/3 x n_embd: ReLU²'s parameter count), so that
# `export-hf` can write it (as Qwen3: QK-norm, no biases)
ARCHS = {"gpt2": {}, "modern": MODERN, "llama": {**MODERN, "activation": "swiglu", "mlp_hidden": 512},
         "modern-tied": {**MODERN, "tie_embeddings": True}, "rope-only": dict(pos_encoding="rope")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--archs", default="gpt2,modern", help=f"comma-separated, of {', '.join(ARCHS)}")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for arch in args.archs.split(","):
            base = DemoConfig(device="cpu", minutes=args.minutes)
            with tempfile.TemporaryDirectory() as out:
                cfg = dataclasses.replace(base, out=out, model=dataclasses.replace(base.model, **ARCHS[arch]))
                r = run_demo(cfg, say=lambda line: None)
            results.setdefault(arch, []).append({k: r[k] for k in ("steps", "val_loss_after", "quiz_after", "minutes")})
            print(arch, results[arch][-1], flush=True)
    print("| config | steps | val loss | quiz (of 16) | minutes |")
    print("|---|---|---|---|---|")
    for arch, runs in results.items():
        for r in runs:
            print(f"| {arch} | {r['steps']} | {r['val_loss_after']:.3f} | {r['quiz_after']} | {r['minutes']:.2f} |")
    print(json.dumps({"machine": platform.processor() or platform.machine(), "minutes": args.minutes,
                      "results": results}))


if __name__ == "__main__":
    main()
