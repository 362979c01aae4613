"""`gptkit <command>`: one typed function per command, dispatched by Typer.

Commands are thin: they parse options, call a stage module, and print a short summary.
A GptkitError (a user mistake) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from gptkit.config import DEFAULT_TEMPERATURE, FinetuneTrainConfig, TrainConfig
from gptkit.errors import GptkitError

# `gptkit --help` lists the commands in the order of the pipeline, not of this file.
ORDER = ["demo", "info", "train-tokenizer", "prepare", "pretrain", "generate", "finetune", "merge-lora",
         "chat", "evaluate", "compare", "probe", "attention", "serve", "keys", "import-hf", "export-hf", "recipe"]


class _Commands(typer.core.TyperGroup):
    """Every command turns a GptkitError (a user mistake) into one line and exit code 2."""

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GptkitError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build your own GPT: tokenize, pretrain, fine-tune, evaluate, generate, serve.")


@app.callback()
def _root(
    no_verify: Annotated[bool, typer.Option("--no-verify", help="check checkpoint file sizes only, not their "
                                                                "sha256 (faster for huge checkpoints)")] = False,
) -> None:
    """gptkit: build your own GPT end to end."""
    if no_verify:
        from gptkit.checkpoint.rundir import set_verify_hashes

        set_verify_hashes(False)


def _opt(cls: type, name: str) -> typer.models.OptionInfo:
    """An option whose help is declared once, on the config field; its default, after `=` in
    the signature, is read from the same class (TrainConfig.lr, ...)."""
    return typer.Option(help=cls.__dataclass_fields__[name].metadata["help"])


def _config(cls: type, values: dict, **fixed):
    """cls built from the command's parameters that are its fields (values: the command's locals())."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names}, **fixed)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


# ---------------------------------------------------------------------------- info
@app.command()
def info(
    preset: Annotated[Optional[str], typer.Option(help="a preset name, e.g. gpt2, gpt3-175b, tiny")] = None,
    ckpt: Annotated[Optional[Path], typer.Option(help="a checkpoint folder instead of a preset")] = None,
    world_size: Annotated[Optional[int], typer.Option(help="also print training memory per device for this "
                                                           "many processes, DDP vs FSDP")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Parameter count, training FLOPs per token and memory of a model, without allocating it."""
    from gptkit.config import PRESETS
    from gptkit.model.size import model_stats, per_device_memory

    if (preset is None) == (ckpt is None):
        _fail(f"give exactly one of --preset NAME or --ckpt DIR (presets: {', '.join(PRESETS)})")
    if preset is not None:
        from gptkit.config import preset as get_preset

        cfg, name = get_preset(preset), preset
    else:
        from gptkit.checkpoint.open import read_meta

        cfg, name = read_meta(ckpt).model, str(ckpt)
    stats = model_stats(cfg)
    if world_size is not None:
        if world_size < 1:
            _fail(f"--world-size {world_size}: must be at least 1")
        stats["per_device"] = {"world_size": world_size, **per_device_memory(cfg, world_size)}
    if json_out:
        typer.echo(json.dumps({"name": name, **stats}))
        return
    typer.echo(f"{name}: n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} "
               f"context={cfg.block_size} vocab={cfg.vocab_size} positions={cfg.pos_encoding}")
    typer.echo(f"  parameters            {_human(stats['params'])} ({stats['params']:,})")
    typer.echo(f"  non-embedding params  {_human(stats['non_embedding_params'])} ({stats['non_embedding_params']:,})")
    typer.echo(f"  training FLOPs/token  {stats['train_flops_per_token']:.3e}  (6N + 12·n_layer·n_embd·context)")
    typer.echo(f"  weights fp32 / bf16   {_gib(stats['weights_bytes_fp32'])} / {_gib(stats['weights_bytes_bf16'])}")
    typer.echo(f"  AdamW state (fp32)    {_gib(stats['adamw_state_bytes'])}  (+ fp32 grads {_gib(stats['grad_bytes_fp32'])})")
    if world_size is not None:
        from gptkit.model.size import format_per_device

        typer.echo(format_per_device(stats["per_device"]))


# ---------------------------------------------------------------------------- pretrain
@app.command()
def pretrain(
    data: Annotated[Path, typer.Argument(help="a folder made by `gptkit prepare`")],
    out: Annotated[Path, _opt(TrainConfig, "out_dir")] = Path(TrainConfig.out_dir),
    preset: Annotated[str, typer.Option(help="model size preset (see `gptkit info`)")] = "tiny",
    n_layer: Annotated[Optional[int], typer.Option(help="override the preset's layers")] = None,
    n_head: Annotated[Optional[int], typer.Option(help="override the preset's heads")] = None,
    n_embd: Annotated[Optional[int], typer.Option(help="override the preset's width")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="override the preset's context length")] = None,
    dropout: Annotated[float, typer.Option(help="dropout probability")] = 0.0,
    pos_encoding: Annotated[str, typer.Option(help="learned | sinusoidal")] = "learned",
    max_steps: Annotated[int, _opt(TrainConfig, "max_steps")] = TrainConfig.max_steps,
    batch_size: Annotated[int, _opt(TrainConfig, "batch_size")] = TrainConfig.batch_size,
    grad_accum: Annotated[int, _opt(TrainConfig, "grad_accum")] = TrainConfig.grad_accum,
    lr: Annotated[float, _opt(TrainConfig, "lr")] = TrainConfig.lr,
    min_lr: Annotated[Optional[float], _opt(TrainConfig, "min_lr")] = TrainConfig.min_lr,
    warmup_steps: Annotated[int, _opt(TrainConfig, "warmup_steps")] = TrainConfig.warmup_steps,
    weight_decay: Annotated[float, _opt(TrainConfig, "weight_decay")] = TrainConfig.weight_decay,
    beta2: Annotated[float, _opt(TrainConfig, "beta2")] = TrainConfig.beta2,
    grad_clip: Annotated[float, _opt(TrainConfig, "grad_clip")] = TrainConfig.grad_clip,
    optimizer: Annotated[str, _opt(TrainConfig, "optimizer")] = TrainConfig.optimizer,
    eval_interval: Annotated[int, _opt(TrainConfig, "eval_interval")] = TrainConfig.eval_interval,
    eval_batches: Annotated[int, _opt(TrainConfig, "eval_batches")] = TrainConfig.eval_batches,
    log_interval: Annotated[int, _opt(TrainConfig, "log_interval")] = TrainConfig.log_interval,
    dtype: Annotated[str, _opt(TrainConfig, "dtype")] = TrainConfig.dtype,
    compile: Annotated[bool, _opt(TrainConfig, "compile")] = TrainConfig.compile,
    strategy: Annotated[str, _opt(TrainConfig, "strategy")] = TrainConfig.strategy,
    activation_checkpointing: Annotated[bool, _opt(TrainConfig, "activation_checkpointing")] = (
        TrainConfig.activation_checkpointing),
    seed: Annotated[int, _opt(TrainConfig, "seed")] = TrainConfig.seed,
    init_from: Annotated[Optional[Path], typer.Option(help="start from this checkpoint's weights")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out exactly where it stopped")] = False,
    stop_at: Annotated[Optional[int], _opt(TrainConfig, "stop_at")] = TrainConfig.stop_at,
    keep: Annotated[int, _opt(TrainConfig, "keep")] = TrainConfig.keep,
) -> None:
    """Pretrain a GPT on prepared token shards. Runs unchanged under torchrun (DDP or FSDP)."""
    import dataclasses

    from gptkit.config import preset as get_preset
    from gptkit.training.loop import pretrain as run

    overrides = {k: v for k, v in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size).items()
                 if v is not None}
    model_cfg = dataclasses.replace(get_preset(preset), dropout=dropout, pos_encoding=pos_encoding, **overrides)
    cfg = _config(TrainConfig, locals(), out_dir=str(out))
    last = run(data, model_cfg, cfg, init_from=str(init_from) if init_from else None, resume=resume,
               log=lambda m: typer.echo(m, err=True))
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        typer.echo(f"done: step {last.get('step')} loss {last.get('loss', float('nan')):.4f}"
                   + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
                   + f"; checkpoint in {out}")


# ---------------------------------------------------------------------------- Hugging Face
@app.command("import-hf")
def import_hf(
    src: Annotated[str, typer.Argument(help="a Hugging Face GPT-2 folder (config.json + weights + tokenizer), "
                                            "or a hub name when huggingface_hub is installed")],
    out: Annotated[Path, typer.Argument(help="gptkit checkpoint folder to write")],
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Convert a Hugging Face GPT-2-family model into a gptkit checkpoint (tokenizer included)."""
    from gptkit.checkpoint.hf import import_hf as run

    s = run(src, out)
    _summary(s, json_out, f"imported {s['source']}: {s['n_layer']} layers, n_embd {s['n_embd']}, "
                          f"vocab {s['vocab_size']}, {_human(s['params'])} params, "
                          f"tokenizer {s['tokenizer_vocab']} tokens -> {s['out']}")


@app.command("export-hf")
def export_hf(
    ckpt: Annotated[Path, typer.Argument(help="a gptkit checkpoint folder")],
    out: Annotated[Path, typer.Argument(help="folder to write for transformers' from_pretrained")],
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Write a checkpoint as a GPT2LMHeadModel folder with a fast tokenizer (no custom code needed)."""
    from gptkit.checkpoint.hf import export_hf as run

    s = run(ckpt, out)
    _summary(s, json_out, f"exported {ckpt} -> {s['out']}: GPT2LMHeadModel, {s['tensors']} tensors, "
                          f"{_human(s['params'])} params, vocab {s['vocab_size']}; tokenizer {s['tokenizer_vocab']} "
                          f"tokens, eos {s['eos_token']}")


def _summary(s: dict, json_out: bool, line: str) -> None:
    """A command's result: one human line, or (--json) the whole summary as JSON."""
    typer.echo(json.dumps(s) if json_out else line)


# ---------------------------------------------------------------------------- generate / chat
def _engine_for(ckpt: Path, max_batch: int = 8, quantize: Optional[str] = None, dtype: str = "float32"):
    """Load a checkpoint into the one inference engine; returns (engine, tokenizer)."""
    from gptkit.inference.factory import open_engine

    engine, loaded = open_engine(ckpt, max_batch=max_batch, quantize=quantize, dtype=dtype)
    return engine, loaded.tokenizer


@app.command()
def generate(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="prompt text (default: read stdin)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        help="tokens to generate (default: 200, or as many as the context leaves room for)")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = DEFAULT_TEMPERATURE,
    top_k: Annotated[int, typer.Option(help="sample from the k most likely tokens (0 = off)")] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop sequence (repeatable); not included in the output")] = None,
    n: Annotated[int, typer.Option(help="number of samples")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="random seed for reproducible samples")] = None,
    truncate: Annotated[bool, typer.Option(help="drop the start of a prompt too long for the context")] = False,
    quantize: Annotated[Optional[str], typer.Option(help="int8: weight-only int8 quantisation")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16")] = "float32",
) -> None:
    """Continue a prompt, streaming the text to the terminal (KV-cached)."""
    from gptkit.config import SampleConfig
    from gptkit.text.stream import TextStream

    if prompt is None:
        prompt = sys.stdin.read()
    engine, tokenizer = _engine_for(ckpt, max_batch=max(n, 1), quantize=quantize, dtype=dtype)
    ids = tokenizer.encode(prompt)
    if max_tokens is None:
        max_tokens = max(1, min(200, engine.config.block_size - len(ids)))
    room = engine.config.block_size - max_tokens
    if len(ids) > room:
        if room < 1:
            _fail(f"max_tokens {max_tokens} leaves no room for a prompt in the context of {engine.config.block_size}")
        if not truncate:
            _fail(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} = {len(ids) + max_tokens} > context "
                  f"{engine.config.block_size}; --truncate keeps the prompt's last {room} tokens")
        ids = ids[-room:]
    params = SampleConfig(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop=list(stop or []), seed=seed)
    streams = [TextStream(tokenizer, params.stop) for _ in range(n)]
    handle = engine.submit(ids, params, n=n)
    outputs = [""] * n
    if n == 1:  # the prompt, then the continuation as it is generated
        sys.stdout.write(tokenizer.decode(ids))
    for event in handle:
        delta = streams[event.index].push(event)
        outputs[event.index] += delta
        if n == 1 and delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
    if n == 1:
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(outputs):
            typer.echo(f"--- sample {i + 1} ---\n{prompt}{text}")


@app.command()
def chat(
    ckpt: Annotated[Path, typer.Argument(help="a chat-tuned checkpoint folder")],
    system: Annotated[Optional[str], typer.Option(help="system message")] = None,
    max_tokens: Annotated[int, typer.Option(help="longest reply in tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = DEFAULT_TEMPERATURE,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = 0.95,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
) -> None:
    """Interactive chat with streaming replies. Commands: /reset, /system TEXT, /exit."""
    from gptkit.config import SampleConfig
    from gptkit.text.stream import TextStream
    from gptkit.text.chat import render_chat, use_chat_template

    engine, tokenizer = _engine_for(ckpt, max_batch=1)
    source = use_chat_template(tokenizer)
    if source == "fallback":
        typer.echo("(the tokenizer has no chat tokens: chatting with the plain-text template)", err=True)
    history: list[dict] = []
    typer.echo("chat with your model — /reset clears the history, /system TEXT sets the system message, /exit quits",
               err=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = []
            typer.echo("(history cleared)", err=True)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            typer.echo(f"(system message {'set' if system else 'cleared'})", err=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids, _ = render_chat(tokenizer, messages)
        # keep the most recent turns when the conversation outgrows the context
        while len(ids) + max_tokens > engine.config.block_size and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[-1:]
            messages = ([{"role": "system", "content": system}] if system else []) + history
            ids, _ = render_chat(tokenizer, messages)
        params = SampleConfig(max_tokens=min(max_tokens, engine.config.block_size - len(ids)),
                              temperature=temperature, top_p=top_p, seed=seed, stop=tokenizer.chat_template.stop)
        stream, reply = TextStream(tokenizer, params.stop), ""
        sys.stdout.write("model> ")
        for event in engine.submit(ids, params):
            delta = stream.push(event)
            reply += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


@app.command()
def attention(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder")],
    text: Annotated[str, typer.Argument(help="the text to run, e.g. 我有一个梦想")],
    layer: Annotated[Optional[int], typer.Option(help="layer to draw (default: the last)")] = None,
    head: Annotated[Optional[int], typer.Option(help="draw this head large (default: a grid of all heads)")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("attention.png"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write every layer's weights as JSON")] = None,
) -> None:
    """Attention maps: which earlier tokens each token attends to (softmax weights of the real forward)."""
    from gptkit.evaluation.attention import run

    typer.echo(run(ckpt, text, out=out, layer=layer, head=head, json_out=json_out))


# ---------------------------------------------------------------------------- tokenizer and corpus
_INPUTS_HELP = ("text files, folders (walked recursively for .txt .text .md .markdown .rst .tex .py .pyi .c .h .cc "
                ".cpp .hpp .js .ts .java .go .rs .sh .html .css .toml .yaml .yml .jsonl; hidden entries skipped), "
                "globs ('data/**/*.md'), .jsonl files (one document per line), or `stdlib`: the Python "
                "standard library's documentation and source code")


@app.command("train-tokenizer")
def train_tokenizer(
    inputs: Annotated[list[str], typer.Argument(help=_INPUTS_HELP)],
    out: Annotated[Path, typer.Option(help="folder to write the tokenizer to")],
    kind: Annotated[str, typer.Option(help="bpe (byte-level BPE) | char (one token per character)")] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size, special tokens included")] = 4096,
    text_field: Annotated[str, typer.Option(help="the text field of .jsonl inputs")] = "text",
) -> None:
    """Train a tokenizer on a corpus; <|endoftext|>, <|im_start|>, <|im_end|> are reserved."""
    import itertools
    import time

    from gptkit.data.sources import iter_documents
    from gptkit.text.tokenizer import BPETokenizer, CharTokenizer

    t0 = time.perf_counter()
    documents = iter_documents(inputs, text_field)
    first = next(documents, None)
    if first is None:
        raise GptkitError(f"no text found in {' '.join(inputs)}")
    texts = itertools.chain([first], documents)
    if kind == "bpe":
        tok = BPETokenizer.train(texts, vocab_size)
    elif kind == "char":
        tok = CharTokenizer.train(texts)
    else:
        raise GptkitError(f"--kind {kind!r}: expected bpe or char")
    tok.save(out)
    typer.echo(f"{kind} tokenizer, vocab_size {tok.vocab_size}, special tokens {tok.special_tokens}, "
               f"trained in {time.perf_counter() - t0:.1f}s; saved to {out}")


@app.command()
def prepare(
    inputs: Annotated[list[str], typer.Argument(help=_INPUTS_HELP)],
    tokenizer: Annotated[Path, typer.Option(help="a tokenizer folder (gptkit train-tokenizer, GPT-2 files, ...)")],
    out: Annotated[Path, typer.Option(help="folder for the token shards and meta.json")],
    text_field: Annotated[str, typer.Option(help="the text field of .jsonl inputs")] = "text",
    val_fraction: Annotated[float, typer.Option(help="share of documents (or of a large document's tail) "
                                                     "held out for validation")] = 0.005,
    workers: Annotated[int, typer.Option(help="encoding processes (1: this process; BPE then uses all cores)")] = 1,
    shard_tokens: Annotated[int, typer.Option(help="tokens per shard file")] = 100_000_000,
) -> None:
    """Tokenize a corpus into train/val token shards (uint16/uint32 memmaps) plus meta.json."""
    from gptkit.checkpoint.rundir import resolve_checkpoint
    from gptkit.data.prepare import prepare as run

    # a checkpoint's tokenizer may be named by its run folder: prepare reads the step folder it resolves to
    meta = run(inputs, resolve_checkpoint(tokenizer), out, text_field=text_field, val_fraction=val_fraction, workers=workers,
               shard_tokens=shard_tokens, progress=sys.stderr.isatty(),
               warn=lambda m: typer.echo(f"warning: {m}", err=True))
    for split, s in meta["splits"].items():
        typer.echo(f"{split:5s} {s['tokens']:>12,} tokens  {s['documents']:>8,} documents  "
                   f"{len(s['shards'])} shard(s)  {meta['text_bytes'][split]:,} text bytes")
    typer.echo(f"{len(meta['sources'])} source(s), dtype {meta['dtype']}, vocab {meta['vocab_size']}; "
               f"{meta['seconds']:.1f}s, {_human(meta['tokens_per_s'])} tokens/s; wrote {out}/meta.json")


# ---------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the tokenizer, data and checkpoint go")] = Path("runs/demo"),
    steps: Annotated[Optional[int], typer.Option(help="training steps (default: 500 on a CPU, 4-10 minutes on "
                                                      "2 cores; 2000 of a bigger model on a GPU)")] = None,
    optimizer: Annotated[str, _opt(TrainConfig, "optimizer")] = TrainConfig.optimizer,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (auto: a GPU when there is one)")] = "auto",
) -> None:
    """The main job: tokenizer, corpus, pretraining and samples on the Python standard library."""
    from gptkit.recipes.demo import DemoConfig, resolve_device, run_demo

    cfg, _ = resolve_device(DemoConfig(out=str(out), optimizer=optimizer, device=device))
    cfg = dataclasses.replace(cfg, steps=steps) if steps is not None else cfg
    result = run_demo(cfg, say=typer.echo)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "samples"}))


# ---------------------------------------------------------------------------- fine-tuning and evaluation
@app.command()
def finetune(
    base: Annotated[Path, typer.Argument(help="the checkpoint to start from")],
    data: Annotated[list[str], typer.Argument(help="data files, each PATH or PATH@WEIGHT (several: a multi-task "
                                                   "mixture). .jsonl with messages | prompt/completion | "
                                                   "text/label | text records, or plain text")],
    out: Annotated[Path, _opt(FinetuneTrainConfig, "out_dir")] = Path(FinetuneTrainConfig.out_dir),
    task: Annotated[str, typer.Option(help="auto | lm | classify: what the data must be")] = "auto",
    val: Annotated[Optional[list[str]], typer.Option(help="a validation file per data file, in order "
                                                          "(default: --val-fraction of each)")] = None,
    val_fraction: Annotated[float, typer.Option(help="share of records held out for validation")] = 0.05,
    skip_bad: Annotated[bool, typer.Option(help="skip malformed records (counted) instead of stopping")] = False,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tuning")] = 0,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha/rank)")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="dropout on the LoRA input")] = 0.0,
    lora_targets: Annotated[str, typer.Option(help="comma-separated layers to adapt")] = "c_attn,c_proj,c_fc",
    max_steps: Annotated[int, _opt(FinetuneTrainConfig, "max_steps")] = FinetuneTrainConfig.max_steps,
    batch_size: Annotated[int, _opt(FinetuneTrainConfig, "batch_size")] = FinetuneTrainConfig.batch_size,
    grad_accum: Annotated[int, _opt(FinetuneTrainConfig, "grad_accum")] = FinetuneTrainConfig.grad_accum,
    lr: Annotated[float, _opt(FinetuneTrainConfig, "lr")] = FinetuneTrainConfig.lr,
    warmup_steps: Annotated[int, _opt(FinetuneTrainConfig, "warmup_steps")] = FinetuneTrainConfig.warmup_steps,
    weight_decay: Annotated[float, _opt(FinetuneTrainConfig, "weight_decay")] = FinetuneTrainConfig.weight_decay,
    optimizer: Annotated[str, _opt(FinetuneTrainConfig, "optimizer")] = FinetuneTrainConfig.optimizer,
    eval_interval: Annotated[int, _opt(FinetuneTrainConfig, "eval_interval")] = FinetuneTrainConfig.eval_interval,
    eval_batches: Annotated[int, _opt(FinetuneTrainConfig, "eval_batches")] = FinetuneTrainConfig.eval_batches,
    log_interval: Annotated[int, _opt(FinetuneTrainConfig, "log_interval")] = FinetuneTrainConfig.log_interval,
    strategy: Annotated[str, _opt(FinetuneTrainConfig, "strategy")] = FinetuneTrainConfig.strategy,
    activation_checkpointing: Annotated[bool, _opt(FinetuneTrainConfig, "activation_checkpointing")] = (
        FinetuneTrainConfig.activation_checkpointing),
    seed: Annotated[int, _opt(FinetuneTrainConfig, "seed")] = FinetuneTrainConfig.seed,
    resume: Annotated[bool, typer.Option(help="continue the run in --out where it stopped")] = False,
    keep: Annotated[int, _opt(FinetuneTrainConfig, "keep")] = FinetuneTrainConfig.keep,
) -> None:
    """Fine-tune a checkpoint (full or LoRA) on chat, completion, classification or text data (torchrun: DDP/FSDP)."""
    from gptkit.training.finetune import DataSpec, FinetuneConfig, finetune as run
    from gptkit.model.lora import LoRAConfig

    specs = [DataSpec.parse(d) for d in data]
    if val:
        if len(val) != len(specs):
            _fail(f"{len(val)} --val file(s) for {len(specs)} data file(s): give one per data file, in order")
        for spec, v in zip(specs, val):
            spec.val = v
    lora = LoRAConfig(lora_rank, lora_alpha, lora_dropout, tuple(lora_targets.split(","))) if lora_rank else None
    cfg = _config(FinetuneTrainConfig, locals(), out_dir=str(out))
    ft = FinetuneConfig(task=task, lora=lora, val_fraction=val_fraction, skip_bad=skip_bad)
    last = run(base, specs, cfg, ft, resume=resume, log=lambda m: typer.echo(m, err=True))
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        typer.echo(f"done: step {last.get('step')} loss {last.get('loss', float('nan')):.4f}"
                   + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
                   + f"; {last['method']}, {last['trainable_params']:,} trained parameters; checkpoint in {out}")


@app.command("merge-lora")
def merge_lora(
    ckpt: Annotated[Path, typer.Argument(help="a LoRA checkpoint from `gptkit finetune --lora-rank R`")],
    out: Annotated[Path, typer.Argument(help="folder for the standalone merged checkpoint")],
) -> None:
    """Fold LoRA adapters into their layers: a full checkpoint with identical outputs, no base needed."""
    from gptkit.checkpoint.format import save_checkpoint
    from gptkit.checkpoint.open import open_checkpoint
    from gptkit.model.lora import merge_lora as merge

    loaded = open_checkpoint(ckpt)
    if not loaded.meta.is_lora:
        _fail(f"{ckpt}: not a LoRA checkpoint (no extra.lora in config.json)")
    model = loaded.model
    n = merge(model)
    extra = {k: v for k, v in loaded.meta.extra.items() if k not in ("lora", "base")} | {"merged_from": str(ckpt)}
    save_checkpoint(out, model, loaded.tokenizer, step=loaded.meta.step, extra=extra)
    typer.echo(f"merged {n} LoRA layers of {ckpt} into {out} ({_human(model.num_params())} params)")


@app.command()
def evaluate(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder")],
    task: Annotated[str, typer.Option(help="perplexity | classify | qa | summarize | translate | code")],
    data: Annotated[Path, typer.Option(help="a text file (perplexity) or a .jsonl of the task's records")],
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the results (default CKPT/eval-TASK.json)")] = None,
    max_tokens: Annotated[int, typer.Option(help="longest generated answer in tokens")] = 64,
    limit: Annotated[Optional[int], typer.Option(help="score only the first N records")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per program (code)")] = 10.0,
) -> None:
    """Score a checkpoint: perplexity/bpb, accuracy/macro-F1, EM/F1, ROUGE-L, BLEU/chrF or pass@1."""
    from gptkit.evaluation.evaluate import evaluate as run, format_table
    from gptkit.fileio import atomic_write_json

    result = run(ckpt, task, data, max_tokens=max_tokens, limit=limit, timeout=timeout,
                 log=lambda m: typer.echo(m, err=True))
    out = out or ckpt / f"eval-{task}.json"
    atomic_write_json(out, result)
    typer.echo(format_table(result))
    typer.echo(f"wrote {out}")


@app.command()
def compare(
    ckpts: Annotated[list[str], typer.Argument(help="checkpoint folders (or Hugging Face GPT-2 folders); "
                                                   "CKPT@int8 for its weight-only int8 version; NAME=CKPT "
                                                   "names it in the report")],
    data: Annotated[Optional[Path], typer.Option(help="raw text, or a prepared folder (its val split is decoded)")] = None,
    tasks: Annotated[Optional[Path], typer.Option(help="a .jsonl of task records in an `evaluate` format")] = None,
    task: Annotated[str, typer.Option(help="auto | qa | summarize | translate | classify | code")] = "auto",
    prompts: Annotated[Optional[Path], typer.Option(help="a text file, one prompt per line")] = None,
    out: Annotated[Path, typer.Option(help="folder for index.html, report.md, results.json, PNGs")] = Path("report"),
    max_tokens: Annotated[int, typer.Option(help="longest task answer in tokens")] = 64,
    limit: Annotated[Optional[int], typer.Option(help="score only the first N task records")] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples")] = 1000,
    seed: Annotated[int, typer.Option(help="seed for resampling and sampled answers")] = 0,
) -> None:
    """Evaluate checkpoints side by side (size, speed, bits/byte, task metrics with bootstrap intervals)."""
    from gptkit.evaluation.compare import CompareConfig, compare as run, last_line

    cfg = CompareConfig(data=data, tasks=tasks, task=task, prompts=prompts, out=out, max_tokens=max_tokens,
                        limit=limit, bootstrap=bootstrap, seed=seed)
    s = run(ckpts, cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo((out / "report.md").read_text(encoding="utf-8").split("## Answers")[0].rstrip())
    typer.echo(f"wrote {out / 'index.html'}, {out / 'report.md'}, {out / 'results.json'}")
    typer.echo(json.dumps(last_line(s)))


probe_app = typer.Typer(cls=_Commands, no_args_is_help=True, help="Probe a model's likelihoods.")
app.add_typer(probe_app, name="probe")


@probe_app.command("bias")
def probe_bias(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder")],
    templates: Annotated[Optional[Path], typer.Option(help="your own .jsonl of sentence pairs (default: built-in "
                                                           "English and Chinese set)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for bias.png, results.json, report.md "
                                                     "(default CKPT/probe-bias)")] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples")] = 1000,
) -> None:
    """Which sentence of each pair (differing only in a group term) the model finds likelier, per category."""
    from gptkit.evaluation.probe import format_table, last_line, probe_bias as run

    s = run(ckpt, templates, out or ckpt / "probe-bias", bootstrap=bootstrap)
    typer.echo(format_table(s))
    typer.echo(json.dumps(last_line(s), ensure_ascii=False))


@app.command()
def recipe(
    name: Annotated[str, typer.Argument(help="arithmetic | docs | classify | multitask")],
    out: Annotated[Path, typer.Option(help="folder for the recipe's data and checkpoints")] = Path("runs/recipes"),
    base: Annotated[Optional[Path], typer.Option(help="docs: the base checkpoint (default runs/demo/model, "
                                                      "else a small one is trained first)")] = None,
    fast: Annotated[bool, typer.Option(help="a smaller, quicker version (what the tests run)")] = False,
    seed: Annotated[int, typer.Option(help="random seed")] = 1337,
    optimizer: Annotated[str, _opt(TrainConfig, "optimizer")] = TrainConfig.optimizer,
) -> None:
    """Prove learning end to end on locally generated data; the last line is one JSON object of metrics."""
    from gptkit.recipes.finetune import run_recipe

    metrics = run_recipe(name, out, base=str(base) if base else None, fast=fast, seed=seed, optimizer=optimizer,
                         log=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(metrics))


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"




def main() -> None:
    try:
        app()
    except GptkitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
