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
