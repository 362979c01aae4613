"""`gptkit import-hf` and `export-hf`: Hugging Face checkpoints in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gptkit.cli.common import app, human, summary


# ---------------------------------------------------------------------------- Hugging Face
@app.command("import-hf")
def import_hf(
    src: Annotated[str, typer.Argument(help="a Hugging Face GPT-2 or Llama-family (Llama, Qwen2, Qwen3, Mistral) folder "
                                            "(config.json + weights + tokenizer), "
                                            "or a hub name when huggingface_hub is installed")],
    out: Annotated[Path, typer.Argument(help="gptkit checkpoint folder to write")],
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Convert a Hugging Face GPT-2 or Llama-family model into a gptkit checkpoint (tokenizer included)."""
    from gptkit.checkpoint.hf import import_hf as run

    s = run(src, out)
    summary(s, json_out, f"imported {s['source']}: {s['n_layer']} layers, n_embd {s['n_embd']}, "
                          f"vocab {s['vocab_size']}, {human(s['params'])} params, "
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
    summary(s, json_out, f"exported {ckpt} -> {s['out']}: {s['architecture']}, {s['tensors']} tensors, "
                          f"{human(s['params'])} params, vocab {s['vocab_size']}; tokenizer {s['tokenizer_vocab']} "
                          f"tokens, eos {s['eos_token']}")


# ---------------------------------------------------------------------------- llama.cpp / Ollama
@app.command("export-gguf")
def export_gguf(
    ckpt: Annotated[Path, typer.Argument(help="a gptkit checkpoint folder (a LoRA one is merged first)")],
    out: Annotated[Path, typer.Argument(help="the .gguf file to write")],
    dtype: Annotated[str, typer.Option(help="weights as f32 | f16 | bf16 | q8_0 (norms, biases and learned "
                                            "positions stay f32)")] = "f32",
    ollama: Annotated[bool, typer.Option("--ollama", help="also write a Modelfile beside it for `ollama create`")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Write a checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio (tokenizer and chat template included)."""
    from gptkit.checkpoint.llamacpp import export_gguf as run

    s = run(ckpt, out, dtype=dtype, ollama=ollama, force=force)
    fallback = f" ({s['f16_fallback']} matrices in f16: rows not a multiple of 32)" if s["f16_fallback"] else ""
    modelfile = f"; Modelfile -> {s['modelfile']}" if s["modelfile"] else ""
    summary(s, json_out, f"exported {ckpt} -> {s['out']}: llama.cpp {s['architecture']}, {s['dtype']}{fallback}, "
                          f"{s['tensors']} tensors, {human(s['params'])} params, {s['bytes'] / 2**20:.1f} MiB; "
                          f"tokenizer pre {s['pre_tokenizer']}, chat template {s['chat_template']}{modelfile}")
    if not json_out:
        for note in s["notes"]:
            typer.echo(f"note: {note}", err=True)
