"""`gptkit generate` and `chat`: text from a checkpoint through the one engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli.common import app, engine_for
from gptkit.errors import GptkitError
from gptkit.config import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P

# how the weights run, the same for generate and chat
Quantize = Annotated[Optional[str], typer.Option(help="int8: weight-only int8 quantisation")]
Dtype = Annotated[str, typer.Option(help="float32 | bfloat16")]


@app.command()
def generate(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder")],
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="prompt text (default: read stdin)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        help=f"tokens to generate (default: {DEFAULT_MAX_TOKENS}, or as many as the context leaves room for)")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = DEFAULT_TEMPERATURE,
    top_k: Annotated[int, typer.Option(help="sample from the k most likely tokens (0 = off)")] = DEFAULT_TOP_K,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = DEFAULT_TOP_P,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop sequence (repeatable); not included in the output")] = None,
    n: Annotated[int, typer.Option(help="number of samples")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="random seed for reproducible samples")] = None,
    truncate: Annotated[bool, typer.Option(help="drop the start of a prompt too long for the context")] = False,
    json_schema: Annotated[Optional[Path], typer.Option(
        help="a JSON schema file: the continuation is JSON valid under it (or cut by --max-tokens)")] = None,
    quantize: Quantize = None,
    dtype: Dtype = "float32",
) -> None:
    """Continue a prompt, streaming the text to the terminal (KV-cached)."""
    from gptkit.config import SampleConfig
    from gptkit.inference.requests import fit_prompt
    from gptkit.text.stream import TextStream

    if prompt is None:
        prompt = sys.stdin.read()
    engine, tokenizer = engine_for(ckpt, max_batch=max(n, 1), quantize=quantize, dtype=dtype)
    ids, max_tokens = fit_prompt(tokenizer.encode(prompt), max_tokens, engine.config.block_size, truncate)
    params = SampleConfig(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          stop=list(stop or []), seed=seed,
                          grammar=schema_grammar(json_schema, engine) if json_schema else None)
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


def schema_grammar(path: Path, engine) -> str:
    """The grammar of a JSON schema file, checked against the model's tokenizer; one line for a
    missing file, bad JSON or a schema that cannot be enforced."""
    import json

    from gptkit.inference.constrain import json_schema_grammar

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GptkitError(f"{path}: cannot read the JSON schema ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptkitError(f"{path}: not JSON ({e})") from None
    grammar = json_schema_grammar(schema)
    try:
        engine.grammar_vocab.check(grammar)
    except GptkitError as e:
        raise GptkitError(f"{path}: {e}") from None
    return grammar


@app.command()
def chat(
    ckpt: Annotated[Path, typer.Argument(help="a chat-tuned checkpoint folder")],
    system: Annotated[Optional[str], typer.Option(help="system message")] = None,
    max_tokens: Annotated[int, typer.Option(help="longest reply in tokens")] = DEFAULT_MAX_TOKENS,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = DEFAULT_TEMPERATURE,
    top_k: Annotated[int, typer.Option(help="sample from the k most likely tokens (0 = off)")] = DEFAULT_TOP_K,
    top_p: Annotated[float, typer.Option(help="nucleus sampling threshold")] = DEFAULT_TOP_P,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
    quantize: Quantize = None,
    dtype: Dtype = "float32",
) -> None:
    """Interactive chat with streaming replies. Commands: /reset, /system TEXT, /exit."""
    from gptkit.config import SampleConfig
    from gptkit.text.stream import TextStream
    from gptkit.text.chat import fit_conversation, use_chat_template

    # each turn resends the conversation: the prefix cache keeps it from being prefilled again
    engine, tokenizer = engine_for(ckpt, max_batch=1, quantize=quantize, dtype=dtype, prefix_cache_mb=64)
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
        ids, history = fit_conversation(tokenizer, system, history, max_tokens, engine.config.block_size)
        params = SampleConfig(max_tokens=min(max_tokens, engine.config.block_size - len(ids)), temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop=tokenizer.chat_template.stop)
        stream, reply = TextStream(tokenizer, params.stop), ""
        sys.stdout.write("model> ")
        for event in engine.submit(ids, params):
            delta = stream.push(event)
            reply += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
