"""gptkit's engine against transformers' GPT2LMHeadModel, side by side in one run.

Both load the same randomly initialised GPT-2 124M weights. For each (implementation,
dtype) a fresh child process measures prefill tokens/s (one 512-token prompt), decode
tokens/s at batch 1 and batch 8 (128 new tokens after a 32-token prompt, greedy), and its
peak RSS (gptkit's batch 1 on an engine of one row, as `generate` and `chat` run, and again on
the engine of 8 rows that `serve` runs); rounds alternate the implementations so load from other processes on a shared
machine hits both alike, and each figure is the best of its rounds. Decode speed is
(new tokens - 1) / (time for all new tokens - time for the first one), so prefill is left out.

The bandwidth limit is measured here too: the read bandwidth of summing a 1 GiB tensor,
divided by the bytes one decode step must read (every weight except the position table,
the tied head once). The last line of output is one JSON object with every figure.

On CUDA two more cases run beside those: transformers with `cache_implementation="static"`
(which generate() compiles with CUDA graphs on a GPU: the strongest transformers setting) and
gptkit's eager decode step (`static_decode=False`), next to gptkit's default there (the static
step captured as CUDA graphs). `--cases` runs a subset; `--tiny` swaps in a 2-layer GPT-2 shape
to check the script quickly (its figures mean nothing).

llama.cpp runs beside them on CPU (llama-cpp-python, the dev extra): the same weights exported by
`gptkit export-gguf` in f32 and q8_0, the prompt evaluated in one batch, then greedy tokens one at a
time by argmax over its logits, with llama.cpp's default settings otherwise (f16 KV cache) and the
same threads. Batch 8 is not measured for it (its batched decoding is a server feature, not this
API's). Its q8_0 perplexity change is measured as for gptkit's int8, by llama.cpp itself.

`--family llama --kv-heads N` runs the same cases on a Llama-shaped model of GPT-2 124M's width
and depth (12 layers, 12 query heads, n_embd 768, SwiGLU 2048, rotary positions, RMSNorm, an
untied head, vocabulary 32000) with N key/value heads: 12 is full multi-head attention, 4 is
grouped-query. Both sides load the same random LlamaForCausalLM weights; the summary gives the KV
cache bytes per token.

    python benchmarks/inference.py [--rounds 2] [--device cpu|cuda] [--cases gptkit_fp32,...] [--tiny]
                                   [--family gpt2|llama] [--kv-heads 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT, NEW, PREFILL, BATCH = 32, 128, 512, 8
REPEATS = 3  # per figure inside a child; the best one counts (other processes only ever slow us down)
CASES = [("transformers", "float32", None), ("gptkit", "float32", None),
         ("transformers", "bfloat16", None), ("gptkit", "bfloat16", None), ("gptkit", "float32", "int8")]
LLAMACPP_CASES = [("llamacpp", "float32", None), ("llamacpp", "float32", "q8_0")]  # CPU only
CUDA_CASES = [("transformers-static", "float32", None), ("gptkit-eager", "float32", None),
              ("transformers-static", "bfloat16", None), ("gptkit-eager", "bfloat16", None)]
IMPLS = ("transformers", "transformers-static", "gptkit", "gptkit-eager", "llamacpp")
TINY = dict(n_layer=2, n_head=2, n_embd=64)  # --tiny: GPT-2's vocabulary and context, 2 small layers
LLAMA = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             max_position_embeddings=1024, tie_word_embeddings=False)
FAMILY = {"name": "gpt2", "kv_heads": 12}  # set from --family / --kv-heads, in the parent and in each child
VOCAB = 50257


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    shape = {**LLAMA, "num_key_value_heads": FAMILY["kv_heads"]}
    if tiny:
        shape.update(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=min(FAMILY["kv_heads"], 4))
    return LlamaConfig(**shape)


def gpt2_config(tiny: bool):
    from transformers import GPT2Config

    return GPT2Config(**TINY) if tiny else GPT2Config()


def gptkit_config(tiny: bool):
    from gptkit.config import preset

    if FAMILY["name"] == "llama":
        from gptkit.checkpoint.hf_llama import config_from_hf

        cfg = llama_config(tiny).to_dict()
        return config_from_hf({**cfg, "architectures": ["LlamaForCausalLM"]}, "llama benchmark config")
    return dataclasses.replace(preset("gpt2"), **TINY) if tiny else preset("gpt2")


# ------------------------------------------------------------------------------------ the two models
def hf_class():
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return (LlamaForCausalLM, llama_config) if FAMILY["name"] == "llama" else (GPT2LMHeadModel, gpt2_config)


def save_random_gpt2(path: Path, tiny: bool = False) -> None:
    from safetensors.torch import save_file

    cls, config = hf_class()
    torch.manual_seed(0)
    hf = cls(config(tiny))
    tied = FAMILY["name"] == "gpt2"  # GPT-2's head is wte; the Llama shape's is its own
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(path))


def load_transformers(path: Path, dtype: torch.dtype, device: str, tiny: bool = False):
    from safetensors.torch import load_file

    cls, config = hf_class()
    hf = cls(config(tiny))
    hf.load_state_dict(load_file(str(path)), strict=False)  # GPT-2's head is tied to wte
    return hf.to(device=device, dtype=dtype).eval()


def load_gptkit(path: Path, tiny: bool = False):
    from safetensors.torch import load_file

    from gptkit.checkpoint import hf_llama
    from gptkit.checkpoint.format import load_state, tied_keys
    from gptkit.checkpoint.hf import hf_to_gptkit
    from gptkit.model.gpt import GPT

    cfg = gptkit_config(tiny)
    model = GPT(cfg)
    if FAMILY["name"] == "llama":
        expected = {k: v for k, v in model.state_dict().items() if k not in tied_keys(model)}
        state = hf_llama.hf_to_gptkit(load_file(str(path)), expected, cfg.n_layer, str(path))
    else:
        state = hf_to_gptkit(load_file(str(path)), cfg.n_layer, str(path))
    load_state(model, state, source=str(path))
    return model.eval()


# ------------------------------------------------------------------------------------ timing
def best_time(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():  # kernels run asynchronously: wait for them
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_rate(generate, batch: int) -> float:
    """Tokens/s of decoding alone: the first new token (with the prefill) is timed apart."""
    first = best_time(lambda: generate(batch, 1))
    full = best_time(lambda: generate(batch, NEW))
    return batch * (NEW - 1) / (full - first)


def measure_transformers(path: Path, dtype: torch.dtype, device: str, prompts: torch.Tensor, static: bool = False,
                         tiny: bool = False) -> dict:
    model = load_transformers(path, dtype, device, tiny)
    prompts = prompts.to(device)
    # a static cache, which generate() compiles on a GPU (mode "reduce-overhead": CUDA graphs);
    # the first call of each shape compiles, and best_time keeps the best of its repeats
    cache = {"cache_implementation": "static"} if static else {}

    def generate(batch: int, new: int) -> None:
        ids = prompts[:batch]
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, **cache)

    long = torch.randint(0, VOCAB, (1, PREFILL), generator=torch.Generator().manual_seed(1)).to(device)
    prefill = PREFILL / best_time(lambda: model(long, use_cache=True))
    return {"prefill": prefill, "decode_b1": decode_rate(generate, 1), "decode_b8": decode_rate(generate, BATCH),
            "peak_rss_mib": peak_rss_mib()}


def measure_gptkit(path: Path, dtype: torch.dtype, device: str, prompts: torch.Tensor, quantize: str | None,
                   static_decode: bool | None = None, tiny: bool = False) -> dict:
    """Prefill, batch 8 and batch 1 on an engine of 8 rows, as `serve` builds it (on CPU its weights
    prepacked for oneDNN's batched products), then batch 1 on an engine of one row, as `generate` and
    `chat` build it (in fp32 on CPU, MKL's plain weight layout)."""
    import gc

    from gptkit.config import SampleConfig
    from gptkit.inference.engine import Engine

    choice = {} if static_decode is None else {"static_decode": static_decode}  # None: the engine's default
    rows = prompts.tolist()

    def engine_of(max_batch: int) -> Engine:
        return Engine(load_gptkit(path, tiny), max_batch=max_batch, device=device, dtype=dtype, quantize=quantize,
                      **choice)

    def generator(engine: Engine):
        def generate(batch: int, new: int) -> None:
            handles = [engine.submit(rows[i], SampleConfig(max_tokens=new, temperature=0.0)) for i in range(batch)]
            for h in handles:
                h.result()
        return generate

    engine = engine_of(BATCH)
    long = torch.randint(0, VOCAB, (PREFILL,), generator=torch.Generator().manual_seed(1)).tolist()
    prefill = PREFILL / best_time(lambda: generate_one(engine, long))
    out = {"prefill": prefill, "decode_b8": decode_rate(generator(engine), BATCH),
           "decode_b1_batching": decode_rate(generator(engine), 1), "peak_rss_mib": peak_rss_mib()}
    if quantize:  # after the RSS reading: this loads a second, fp32 model
        out["ppl_increase_pct"] = perplexity_increase(path, engine.model, device, tiny)
    engine = None  # freed before the next engine is built
    gc.collect()
    # last, and after the RSS reading: a second engine in one process inherits the first one's heap
    out["decode_b1"] = decode_rate(generator(engine_of(1)), 1)
    return out


def save_gguf(weights: Path, dtype: str, tiny: bool = False) -> Path:
    """The benchmark's weights as `gptkit export-gguf` writes them (f32 or q8_0). The tokenizer is a
    small BPE trained on this file, its vocabulary padded to the model's: the measurement feeds ids."""
    from gptkit.checkpoint.format import save_checkpoint
    from gptkit.checkpoint.llamacpp import export_gguf
    from gptkit.text.tokenizer import BPETokenizer

    out = weights.with_name(f"model-{dtype}.gguf")
    if not out.exists():
        ckpt = weights.with_name("ckpt")
        if not ckpt.exists():
            save_checkpoint(ckpt, load_gptkit(weights, tiny), BPETokenizer.train([Path(__file__).read_text()], 512))
        export_gguf(ckpt, out, dtype=dtype)
    return out


def measure_llamacpp(weights: Path, prompts: torch.Tensor, quantize: str | None) -> dict:
    import llama_cpp
    import numpy as np

    path = weights.with_name(f"model-{quantize or 'f32'}.gguf")
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024 + 2, n_batch=PREFILL, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    prompt = prompts[0].tolist()

    def generate(batch: int, new: int) -> None:
        assert batch == 1
        llm.reset()
        llm.eval(prompt)
        for _ in range(new - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    long = torch.randint(0, VOCAB, (PREFILL,), generator=torch.Generator().manual_seed(1)).tolist()

    def prefill_once() -> None:
        llm.reset()
        llm.eval(long)

    out = {"prefill": PREFILL / best_time(prefill_once), "decode_b1": decode_rate(generate, 1),
           "peak_rss_mib": peak_rss_mib()}
    if quantize:
        out["ppl_increase_pct"] = 100 * (gguf_perplexity(path) / gguf_perplexity(weights.with_name("model-f32.gguf"))
                                         - 1)
    return out


def gguf_perplexity(path: Path) -> float:
    """llama.cpp's perplexity of a GGUF file on the held-out text perplexity_increase uses."""
    import llama_cpp
    import numpy as np

    ids = list(Path(__file__).read_bytes()[:1025])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1026, n_batch=1026, logits_all=True, verbose=False,
                          n_threads=torch.get_num_threads())
    llm.eval(ids[:-1])
    logits = torch.from_numpy(np.array(llm.scores[:len(ids) - 1]))
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


def generate_one(engine, prompt: list[int]) -> None:
    from gptkit.config import SampleConfig

    engine.generate(prompt, SampleConfig(max_tokens=1, temperature=0.0))


@torch.inference_mode()
def perplexity_increase(path: Path, quantized, device: str, tiny: bool = False) -> float:
    """Per cent perplexity increase of the quantised model over fp32 on 1024 tokens of held-out
    text (this file's bytes, which are GPT-2 byte tokens)."""
    ids = torch.tensor([list(Path(__file__).read_bytes()[:1025])], device=device)
    reference = load_gptkit(path, tiny).to(device)

    def ppl(model) -> float:
        return math.exp(model(ids[:, :-1], targets=ids[:, 1:]).item())

    return 100 * (ppl(quantized) / ppl(reference) - 1)


def child(args) -> None:
    torch.manual_seed(0)
    prompts = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    dtype = getattr(torch, args.dtype)
    with torch.inference_mode():
        if args.impl == "llamacpp":
            out = measure_llamacpp(Path(args.weights), prompts, args.quantize)
        elif args.impl.startswith("transformers"):
            out = measure_transformers(Path(args.weights), dtype, args.device, prompts,
                                       static=args.impl == "transformers-static", tiny=args.tiny)
        else:
            static_decode = False if args.impl == "gptkit-eager" else None
            out = measure_gptkit(Path(args.weights), dtype, args.device, prompts, args.quantize, static_decode,
                                 tiny=args.tiny)
    print(json.dumps(out))


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent through fork and exec, so every child would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ the run
def read_bandwidth(device: str) -> float:
    """GB/s of summing a 1 GiB fp32 tensor: the memory read bandwidth decoding can use."""
    x = torch.ones(256 * 1024 * 1024, device=device)
    x.sum()
    seconds = best_time(lambda: x.sum().item(), repeats=5)
    return x.numel() * 4 / seconds / 1e9


def decode_bytes(dtype_bytes: int, tiny: bool = False) -> int:
    """Bytes one decode step reads: every weight but the position table and the token embedding
    (one row of each is read), plus the head (the embedding again when tied)."""
    from gptkit.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(gptkit_config(tiny))
    n = model.num_params() - (model.wpe.weight.numel() if hasattr(model, "wpe") else 0)
    if not model.config.tie_embeddings:  # the head is its own matrix, read whole; of wte one row is read
        n -= model.wte.weight.numel()
    return n * dtype_bytes


def run_case(weights: Path, impl: str, dtype: str, quantize: str | None, device: str, tiny: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--dtype", dtype, "--weights", str(weights), "--device", device,
           "--family", FAMILY["name"], "--kv-heads", str(FAMILY["kv_heads"])]
    if quantize:
        cmd += ["--quantize", quantize]
    if tiny:
        cmd += ["--tiny"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def name(impl: str, dtype: str, quantize: str | None) -> str:
    return f"{impl}_{quantize or {'float32': 'fp32', 'bfloat16': 'bf16'}[dtype]}"


ALL_CASES = CASES + CUDA_CASES + LLAMACPP_CASES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each figure is the best")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=None, help="comma-separated case names to run, e.g. transformers_fp32,gptkit_fp32 "
                    "(default: all for the device)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2 shape: checks the script, not the speed")
    ap.add_argument("--family", choices=("gpt2", "llama"), default="gpt2", help="the model's shape")
    ap.add_argument("--kv-heads", type=int, default=12, help="--family llama: key/value heads (12: full, fewer: GQA)")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global VOCAB
    FAMILY.update(name=args.family, kv_heads=args.kv_heads)
    VOCAB = LLAMA["vocab_size"] if args.family == "llama" else 50257
    if args.child:
        args.impl = args.child
        return child(args)

    cases = CASES + (CUDA_CASES if args.device.startswith("cuda") else LLAMACPP_CASES)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - {name(*c) for c in ALL_CASES}
        if unknown:
            ap.error(f"unknown case(s) {', '.join(sorted(unknown))}: expected names from "
                     f"{', '.join(name(*c) for c in ALL_CASES)}")
        cases = [c for c in ALL_CASES if name(*c) in wanted]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "gpt2-random.safetensors"
        save_random_gpt2(weights, args.tiny)
        for dtype in sorted({q or "f32" for impl, _, q in cases if impl == "llamacpp"} | ({"f32"} if any(
                impl == "llamacpp" and q for impl, _, q in cases) else set())):
            save_gguf(weights, dtype, args.tiny)
        bandwidth = read_bandwidth(args.device)
        for r in range(args.rounds):
            for impl, dtype, quantize in cases:
                key = name(impl, dtype, quantize)
                got = run_case(weights, impl, dtype, quantize, args.device, args.tiny)
                print(f"round {r + 1} {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()), flush=True)
                best = results.setdefault(key, got)
                for k, v in got.items():  # best of rounds: highest speed, lowest memory
                    best[k] = min(best[k], v) if k in ("peak_rss_mib", "ppl_increase_pct") else max(best[k], v)
    bandwidth = max(bandwidth, read_bandwidth(args.device))
    print_table(results)
    print(json.dumps(summary(results, bandwidth, args.device, args.tiny)))


def summary(results: dict[str, dict], bandwidth: float, device: str, tiny: bool = False) -> dict:
    """Every figure, and the ratios whose two cases ran (--cases may leave some out)."""
    # q8_0 stores 32 int8 weights and one fp16 scale per block: 34 bytes per 32 weights
    limit = {d: bandwidth * 1e9 / decode_bytes(b, tiny) for d, b in (("fp32", 4), ("bf16", 2), ("int8", 1),
                                                                       ("q8_0", 34 / 32))}
    cfg = gptkit_config(tiny)
    out = {"device": device, "tiny": tiny, "family": FAMILY["name"], "n_kv_head": cfg.kv_heads,
           "kv_cache_bytes_per_token_fp32": 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * 4,
           "threads": torch.get_num_threads(), "read_bandwidth_gb_s": round(bandwidth, 1),
           **{f"bandwidth_limit_{d}_tok_s": round(v, 1) for d, v in limit.items()}}
    for key, figures in results.items():
        out.update({f"{k}_{key}": round(v, 1) for k, v in figures.items()})

    def ratio(label: str, a: str, b: str, figures=("prefill", "decode_b1", "decode_b8")) -> None:
        if a in results and b in results:
            out.update({f"{fig}_{label}": round(results[a][fig] / results[b][fig], 2) for fig in figures})

    for d in ("fp32", "bf16"):
        ratio(f"{d}_ratio", f"gptkit_{d}", f"transformers_{d}")
        ratio(f"{d}_ratio_vs_static", f"gptkit_{d}", f"transformers-static_{d}", ("decode_b1", "decode_b8"))
        ratio(f"{d}_speedup_vs_eager_step", f"gptkit_{d}", f"gptkit-eager_{d}", ("decode_b1", "decode_b8"))
        if f"gptkit_{d}" in results:
            out[f"decode_b1_{d}_frac_of_limit"] = round(results[f"gptkit_{d}"]["decode_b1"] / limit[d], 2)
            out[f"decode_b1_batching_{d}_frac_of_limit"] = round(results[f"gptkit_{d}"]["decode_b1_batching"]
                                                                 / limit[d], 2)
    for key, d in (("llamacpp_fp32", "fp32"), ("llamacpp_q8_0", "q8_0"), ("gptkit_int8", "int8")):
        if key in results:
            out[f"decode_b1_{key}_frac_of_limit"] = round(results[key]["decode_b1"] / limit[d], 2)
    ratio("fp32_ratio_vs_llamacpp", "gptkit_fp32", "llamacpp_fp32", ("prefill", "decode_b1"))
    ratio("int8_ratio_vs_llamacpp_q8_0", "gptkit_int8", "llamacpp_q8_0", ("prefill", "decode_b1"))
    if "gptkit_int8" in results:
        if "gptkit_fp32" in results:
            out["int8_decode_b1_speedup_vs_fp32"] = round(results["gptkit_int8"]["decode_b1"]
                                                          / results["gptkit_fp32"]["decode_b1"], 2)
        out["int8_ppl_increase_pct"] = round(results["gptkit_int8"]["ppl_increase_pct"], 3)
    if "llamacpp_q8_0" in results:
        out["llamacpp_q8_0_ppl_increase_pct"] = round(results["llamacpp_q8_0"]["ppl_increase_pct"], 3)
    return out


def print_table(results: dict[str, dict]) -> None:
    print(f"\n| {'model':<25} | prefill tok/s | decode b1 tok/s | decode b8 tok/s | b1 in an 8-row engine | peak RSS MiB |")
    print(f"|{'-' * 27}|---------------|-----------------|-----------------|-----------------------|--------------|")
    for key, f in results.items():
        b8 = f"{f['decode_b8']:15.1f}" if "decode_b8" in f else f"{'—':>15}"
        b1b = f"{f['decode_b1_batching']:21.1f}" if "decode_b1_batching" in f else f"{'—':>21}"
        print(f"| {key:<25} | {f['prefill']:13.0f} | {f['decode_b1']:15.1f} | {b8} | {b1b} | {f['peak_rss_mib']:12.0f} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
