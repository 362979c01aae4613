"""gptkit's trainer beside nanoGPT's, in one run, on the same machine and the same token files.

    python benchmarks/train_vs_nanogpt.py                     # CPU: Tiny Shakespeare, characters
    python benchmarks/train_vs_nanogpt.py --rounds 2          # nanoGPT, gptkit, nanoGPT, gptkit
    python benchmarks/train_vs_nanogpt.py --device cuda       # GPT-2 124M on the stdlib, BPE 32k

The reference (../shared/reference/nanoGPT: nanoGPT's own train.py and model.py, unchanged)
is copied to a temporary folder and prepares the data; both trainers then read the same
train.bin / val.bin. Each run is a subprocess timed from start to exit (imports, data
loading, its own evaluations and its final checkpoint included).

Both validation losses are computed here, the same way, from each run's final weights: the
mean next-token loss over every non-overlapping window of the whole validation split. The
gptkit worker also keeps a copy of its weights every --snapshot-every steps with the time,
so `gptkit_time_to_nanogpt_loss_s` is the first moment (from process start) at which
gptkit's weights scored at or below nanoGPT's final loss of the same round (--score-every N
scores every N steps, then each snapshot before the first that reaches it: a step-exact time
with --snapshot-every 1 for a fifth of the scoring).

CPU settings are nanoGPT's CPU baseline from its README (4 layers, 4 heads, 128 wide, 64
characters of context, batch 12, 2000 iterations, lr 1e-3 with cosine to 1e-4, dropout 0).
gptkit trains the same model on the same data with the same batch, with --gptkit-optimizer
(default muon) at --gptkit-lr, warmup a tenth of the steps then cosine to a tenth of the lr,
for --gptkit-iters steps.

`--gptkit-archs gpt2,modern` trains each named gptkit configuration in every round, beside the
same nanoGPT run: `gpt2` is nanoGPT's model (learned positions, LayerNorm, GELU, tied head);
`modern` the later decoders' choices (ARCHS: rotary positions, RMSNorm, QK-norm, a ReLU² MLP, an
untied head), with the same width, depth, data, batch, optimizer and schedule. `ARCH@RECIPE`
trains it with a training recipe of RECIPES instead of the flags' (CPU only): `fast` is the one
chosen by measurement for this model (32 sequences a step, 110 steps, higher learning rates);
`modern-gqa@fast-pe` its cheaper form (2 KV heads, SwiGLU of 256, 3 Polar Express iterations in Muon).

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CPU_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 / H200 SXM
MODERN = dict(pos_encoding="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False)
ARCHS = {"gpt2": {}, "modern": MODERN,
         # the modern configuration with one choice taken back (or swapped), to see what each one pays
         "modern-learned": {**MODERN, "pos_encoding": "learned"}, "modern-layernorm": {**MODERN, "norm": "layernorm"},
         "modern-no-qknorm": {**MODERN, "qk_norm": False}, "modern-gelu": {**MODERN, "activation": "gelu"},
         "modern-tied": {**MODERN, "tie_embeddings": True},
         "modern-swiglu": {**MODERN, "activation": "swiglu", "mlp_hidden": 341},  # ~ReLU²'s 4x params
         # Qwen3's form made cheaper: 2 KV heads for 4 query heads, SwiGLU of 256 (a step costs ~0.77x)
         "modern-gqa": {**MODERN, "activation": "swiglu", "mlp_hidden": 256, "n_kv_head": 2}}
# training recipes for ARCH@RECIPE: batch, steps and learning rates instead of the flags' (CPU shape).
# `fast`, chosen by measurement (BENCHMARKS.md): 32 sequences a step (a step of 32 costs ~1.9x one
# of 12 on 2 cores), AdamW's lr 3e-2 for embeddings, head and norms, Muon at 0.3 of it with
# momentum 0.9, warmup 5 % of the steps, cosine to a tenth. `fast-pe`: the same with 3 of Polar
# Express's Newton-Schulz iterations instead of 5 of Jordan's, 120 steps (for modern-gqa's cheaper steps).
RECIPES = {"fast": dict(batch_size=32, iters=110, lr=3e-2, muon_lr_scale=0.3, muon_momentum=0.9, warmup=0.05),
           "fast-pe": dict(batch_size=32, iters=120, lr=3e-2, muon_lr_scale=0.3, muon_momentum=0.9, warmup=0.05,
                           muon_ns="polar-express", muon_ns_steps=3)}


# ---------------------------------------------------------------------------- the two runs
def nanogpt_command(args, out: str) -> list[str]:
    if args.device == "cpu":
        s = CPU_SHAPE
        return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                "--eval_iters=20", "--log_interval=100", f"--block_size={s['block_size']}",
                f"--batch_size={s['batch_size']}", f"--n_layer={s['n_layer']}", f"--n_head={s['n_head']}",
                f"--n_embd={s['n_embd']}", f"--max_iters={args.nanogpt_iters}",
                f"--lr_decay_iters={args.nanogpt_iters}", "--dropout=0.0", f"--eval_interval={args.nanogpt_iters}",
                "--always_save_checkpoint=False", f"--out_dir={out}"]
    return [sys.executable, "train.py", "--dataset=stdlib", "--device=cuda", "--compile=True", "--dtype=bfloat16",
            "--batch_size=16", "--block_size=1024", "--gradient_accumulation_steps=1",
            f"--max_iters={args.nanogpt_iters}", f"--lr_decay_iters={args.nanogpt_iters}", "--warmup_iters=30",
            f"--eval_interval={args.nanogpt_iters}", "--eval_iters=20", "--log_interval=10", "--dropout=0.0",
            "--always_save_checkpoint=False", "--wandb_log=False", f"--out_dir={out}"]


def gptkit_command(args, bins: Path, out: Path, config: str) -> list[str]:
    arch, _, recipe = config.partition("@")
    return [sys.executable, __file__, "--worker", "--device", args.device, "--bins", str(bins), "--out", str(out),
            "--gptkit-iters", str(args.gptkit_iters), "--snapshot-every", str(args.snapshot_every),
            "--seed", str(args.seed), "--gptkit-optimizer", args.gptkit_optimizer,
            "--gptkit-lr", str(args.gptkit_lr), "--arch", arch, "--recipe", recipe]


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run cmd; (start time.time(), wall seconds). Its output goes to log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.time()
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return start, wall


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def whole_split_loss(forward, val: np.ndarray, block: int, device: str, batch: int = 64) -> float:
    """Mean loss over every non-overlapping window of `block` tokens of the validation split;
    forward(x, y) -> mean loss of that batch."""
    x = torch.from_numpy(val.astype(np.int64))
    n = (len(x) - 1) // block
    xs, ys = x[: n * block].view(n, block), x[1: n * block + 1].view(n, block)
    total = 0.0
    for i in range(0, n, batch):
        xb, yb = xs[i:i + batch].to(device), ys[i:i + batch].to(device)
        with _amp(device):
            total += float(forward(xb, yb)) * len(xb)
    return total / n


def _amp(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


def nanogpt_loss(nano_dir: Path, out: Path, val: np.ndarray, device: str) -> float:
    spec = importlib.util.spec_from_file_location("nanogpt_model", nano_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(out / "ckpt.pt", map_location=device, weights_only=False)  # nanoGPT's own pickle
    model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.to(device).eval()
    return whole_split_loss(lambda x, y: model(x, y)[1], val, ckpt["model_args"]["block_size"], device)


def gptkit_losses(out: Path, val: np.ndarray, device: str, start: float, target: float,
                  score_every: int = 0) -> list[dict]:
    """Scored snapshots, in step order: time since process start and whole-split loss.

    Scoring one is a pass over the whole split (~50 training steps' forward), so with score_every
    only the snapshots at multiples of it (and the last) are scored, then every snapshot between
    the first of those at or below target and the one scored before it: the first to reach the
    target is then exact, unless an earlier one dipped below it between two scored above it."""
    from gptkit.model.gpt import GPT
    from gptkit.config import ModelConfig

    saved = torch.load(out / "snapshots.pt", map_location=device, weights_only=True)
    model = GPT(ModelConfig.from_dict(json.loads(saved["config"]))).to(device).eval()
    snaps, scored = saved["snapshots"], {}

    def score(i: int) -> float:
        if i not in scored:
            model.load_state_dict(snaps[i]["state"])
            scored[i] = whole_split_loss(lambda x, y: model(x, targets=y), val, model.config.block_size, device)
        return scored[i]

    coarse = [i for i, s in enumerate(snaps) if not score_every or s["step"] % score_every == 0 or i == len(snaps) - 1]
    first = next((n for n, i in enumerate(coarse) if score(i) <= target), None)
    for i in coarse:
        score(i)
    if first is not None:  # the snapshots between the last scored above the target and the first at or below it
        for j in range(coarse[first - 1] + 1 if first else 0, coarse[first]):
            score(j)
    return [{"step": snaps[i]["step"], "t": snaps[i]["time"] - start, "val_loss": scored[i]} for i in sorted(scored)]


# ---------------------------------------------------------------------------- the gptkit worker
def worker(args) -> None:
    """Train gptkit on train.bin / val.bin and keep timed weight snapshots."""
    from gptkit.config import ModelConfig, TrainConfig, preset
    from gptkit.data.shards import TokenShards
    from gptkit.model.gpt import GPT
    from gptkit.training.loop import train

    bins = Path(args.bins)
    train_ids = np.memmap(bins / "train.bin", dtype=np.uint16, mode="r")
    val_ids = np.memmap(bins / "val.bin", dtype=np.uint16, mode="r")
    vocab = int(max(train_ids.max(), val_ids.max())) + 1
    recipe = RECIPES.get(args.recipe, {})
    if args.device == "cpu":
        s = CPU_SHAPE
        model_cfg = ModelConfig(vocab_size=vocab, block_size=s["block_size"], n_layer=s["n_layer"],
                                n_head=s["n_head"], n_embd=s["n_embd"], bias=False, **ARCHS[args.arch])
        batch = recipe.get("batch_size", s["batch_size"])
    else:
        model_cfg = dataclasses.replace(preset("gpt2"), vocab_size=vocab, **ARCHS[args.arch])
        batch = 16
    lr, steps = recipe.get("lr", args.gptkit_lr), recipe.get("iters", args.gptkit_iters)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = GPT(model_cfg).to(device)
    data = TokenShards([train_ids], [val_ids], block_size=model_cfg.block_size, batch_size=batch, seed=args.seed,
                       eval_batches=20)
    snapshots = []

    def snapshot(step: int, metrics: dict) -> None:
        if step % args.snapshot_every == 0 or step == steps:
            snapshots.append({"step": step, "time": time.time(),
                              "state": {k: v.detach().clone() for k, v in model.state_dict().items()}})

    cfg = TrainConfig(out_dir=args.out, max_steps=steps, batch_size=batch, lr=lr, min_lr=lr / 10,
                      warmup_steps=max(1, round(steps * recipe.get("warmup", 0.1))),
                      beta2=0.99 if args.device == "cpu" else 0.95, optimizer=args.gptkit_optimizer,
                      muon_lr_scale=recipe.get("muon_lr_scale", 1.0), muon_momentum=recipe.get("muon_momentum", 0.95),
                      muon_ns=recipe.get("muon_ns", "jordan"), muon_ns_steps=recipe.get("muon_ns_steps", 5),
                      eval_interval=steps, log_interval=100, seed=args.seed, compile=args.device == "cuda",
                      progress=False)
    last = train(model, data, cfg, None, log=lambda m: None, on_step=snapshot)
    torch.save({"config": json.dumps(model_cfg.to_dict()), "snapshots": snapshots}, Path(args.out) / "snapshots.pt")
    print(json.dumps({"tokens_per_s": last["tokens_per_s"], "train_s": last["elapsed_s"], "steps": last["step"],
                      "ms_per_step": 1000 * last["elapsed_s"] / last["step"]}))


# ---------------------------------------------------------------------------- data
def prepare(args, nano: Path) -> Path:
    if args.device == "cpu":
        bins = nano / "data" / "shakespeare_char"
        shutil.copy(args.data, bins / "input.txt")
        subprocess.run([sys.executable, str(bins / "prepare.py")], check=True, stdout=subprocess.DEVNULL)
        return bins
    # GPU: the standard library through gptkit's BPE (32k) and prepare; nanoGPT reads the same ids.
    from gptkit.data.shards import read_meta

    bins = nano / "data" / "stdlib"
    bins.mkdir(parents=True)
    work = Path(tempfile.mkdtemp())
    gk = [sys.executable, "-m", "gptkit"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(gk + ["train-tokenizer", "stdlib", "--out", str(work / "tok"), "--vocab-size", "32768"],
                   check=True, env=env)
    subprocess.run(gk + ["prepare", "stdlib", "--tokenizer", str(work / "tok"), "--out", str(work / "data")],
                   check=True, env=env)
    meta = read_meta(work / "data")
    for split in ("train", "val"):
        ids = np.concatenate([np.fromfile(work / "data" / name, dtype=np.dtype(meta["dtype"]))
                              for name in meta["splits"][split]["shards"]])
        ids.astype(np.uint16).tofile(bins / f"{split}.bin")
    import pickle

    with open(bins / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)
    return bins


def mfu(tokens_per_s: float, n_params: float, n_layer: int, block: int, n_embd: int) -> float:
    """Model FLOPs utilisation against the bf16 peak (PaLM's 6N + 12 L T d per token)."""
    return tokens_per_s * (6 * n_params + 12 * n_layer * block * n_embd) / H100_BF16_PEAK


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--nanogpt", default=str(ROOT.parent / "shared/reference/nanoGPT"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nanogpt-iters", type=int, default=None, help="default: 2000 on cpu, 300 on cuda")
    ap.add_argument("--gptkit-iters", type=int, default=None, help="default: 750 on cpu, as --nanogpt-iters on cuda")
    ap.add_argument("--gptkit-optimizer", default="muon", choices=["adamw", "muon"])
    ap.add_argument("--gptkit-lr", type=float, default=None, help="default: 3e-3 on cpu, 6e-4 on cuda")
    ap.add_argument("--snapshot-every", type=int, default=50)
    ap.add_argument("--score-every", type=int, default=0,
                    help="score the snapshots at multiples of N steps, then each one before the first that reaches "
                         "nanoGPT's loss (default: score every snapshot)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--gptkit-archs", default="gpt2", help=f"comma-separated gptkit configurations: {', '.join(ARCHS)}")
    ap.add_argument("--arch", default="gpt2", choices=list(ARCHS), help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bins", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.nanogpt_iters = args.nanogpt_iters or (2000 if args.device == "cpu" else 300)
    args.gptkit_iters = args.gptkit_iters or (750 if args.device == "cpu" else args.nanogpt_iters)
    args.gptkit_lr = args.gptkit_lr or (3e-3 if args.device == "cpu" else 6e-4)
    if args.worker:
        return worker(args)

    tmp = Path(tempfile.mkdtemp(prefix="vs-nanogpt-"))
    nano = tmp / "nanoGPT"
    shutil.copytree(args.nanogpt, nano)
    bins = prepare(args, nano)
    val = np.fromfile(bins / "val.bin", dtype=np.uint16)
    archs = args.gptkit_archs.split(",")
    unknown = {a for a in archs if a.partition("@")[0] not in ARCHS or a.partition("@")[2] not in ("", *RECIPES)}
    if unknown:
        ap.error(f"--gptkit-archs: unknown {', '.join(sorted(unknown))}; expected ARCH or ARCH@RECIPE, ARCH one of "
                 f"{', '.join(ARCHS)}, RECIPE one of {', '.join(RECIPES)}")
    if args.device != "cpu" and any("@" in a for a in archs):
        ap.error("--gptkit-archs: recipes (ARCH@RECIPE) are for the CPU shape only")
    rows: dict[str, list[dict]] = {a: [] for a in archs}
    for r in range(args.rounds):
        n_out = tmp / f"nanogpt-{r}"
        n_start, n_wall = timed(nanogpt_command(args, str(n_out)), nano, tmp / f"nanogpt-{r}.log")
        n_loss = nanogpt_loss(nano, n_out, val, args.device)
        print(f"round {r}: nanoGPT {n_wall:.1f} s, val {n_loss:.4f}", flush=True)
        for arch in archs:
            g_out = tmp / f"gptkit-{arch}-{r}"
            g_start, g_wall = timed(gptkit_command(args, bins, g_out, arch), nano, tmp / f"gptkit-{arch}-{r}.log")
            g_stats = json.loads((tmp / f"gptkit-{arch}-{r}.log").read_text().strip().splitlines()[-1])
            curve = gptkit_losses(g_out, val, args.device, g_start, n_loss, args.score_every)
            reached = next((c["t"] for c in curve if c["val_loss"] <= n_loss), None)
            rows[arch].append({"round": r, "nanogpt_wall_s": n_wall, "gptkit_wall_s": g_wall, "nanogpt_val_loss": n_loss,
                               "gptkit_val_loss": curve[-1]["val_loss"], "gptkit_time_to_nanogpt_loss_s": reached,
                               "gptkit_ms_per_step": g_stats["ms_per_step"],
                               "gptkit_tokens_per_s": g_stats["tokens_per_s"],
                               "nanogpt_log": _nanogpt_timing(tmp / f"nanogpt-{r}.log")})
            print(f"  gptkit {arch}: {g_wall:.1f} s, val {curve[-1]['val_loss']:.4f}, reached nanoGPT's loss at "
                  f"{'never' if reached is None else f'{reached:.1f} s'}", flush=True)
            print("    curve: " + ", ".join(f"{c['step']}:{c['val_loss']:.3f}@{c['t']:.0f}s" for c in curve[::4]),
                  flush=True)
    results = {arch: summarise(rows[arch], args, arch) for arch in archs}
    first = results[archs[0]]
    print("\n| | nanoGPT | " + " | ".join(f"gptkit {a}" for a in archs) + " |\n|---|---|"
          + "---|" * len(archs) + f"\n| wall s (mean of {args.rounds}) | {first['nanogpt_wall_s']:.1f} | "
          + " | ".join(f"{results[a]['gptkit_wall_s']:.1f}" for a in archs)
          + f" |\n| val loss, whole split | {first['nanogpt_val_loss']:.4f} | "
          + " | ".join(f"{results[a]['gptkit_val_loss']:.4f}" for a in archs)
          + " |\n| time to nanoGPT's loss, s (ratio of nanoGPT's wall) | | "
          + " | ".join(f"{_fmt(results[a]['gptkit_time_to_nanogpt_loss_s'])} "
                       f"({_fmt(results[a]['time_to_loss_ratio'], '.2f')})" for a in archs) + " |")
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results if len(archs) > 1 else first))


def _nanogpt_timing(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("iter ")]
    return lines[-1] if lines else ""


def _fmt(v, spec: str = ".1f") -> str:
    return "never" if v is None else format(v, spec)


def summarise(rows: list[dict], args, config: str) -> dict:
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    reached = [r["gptkit_time_to_nanogpt_loss_s"] for r in rows]
    ttl = None if None in reached else sum(reached) / len(reached)
    n_wall = mean("nanogpt_wall_s")
    result = {"device": args.device, "rounds": rows, "nanogpt_iters": args.nanogpt_iters,
              "gptkit_iters": args.gptkit_iters, "gptkit_optimizer": args.gptkit_optimizer, "gptkit_lr": args.gptkit_lr,
              "nanogpt_wall_s": n_wall, "gptkit_wall_s": mean("gptkit_wall_s"),
              "speedup": n_wall / mean("gptkit_wall_s"), "nanogpt_val_loss": mean("nanogpt_val_loss"),
              "gptkit_val_loss": mean("gptkit_val_loss"), "gptkit_time_to_nanogpt_loss_s": ttl,
              "time_to_loss_ratio": None if ttl is None else ttl / n_wall, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "config": config,
              "recipe": RECIPES.get(config.partition("@")[2])}
    if args.device == "cuda":
        from gptkit.config import preset

        c = preset("gpt2")
        n = 124e6
        result["gptkit_mfu"] = mfu(mean("gptkit_tokens_per_s"), n, c.n_layer, 1024, c.n_embd)
        result["gpu"] = torch.cuda.get_device_name(0)
    return result


if __name__ == "__main__":
    main()
