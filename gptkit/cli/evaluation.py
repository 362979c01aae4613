"""`gptkit attention`, `evaluate`, `compare` and `probe bias`: looking at what a model learned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli.common import Commands, app
from gptkit.config import ANSWER_MAX_TOKENS


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


@app.command()
def evaluate(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder")],
    task: Annotated[str, typer.Option(help="perplexity | classify | qa | summarize | translate | code")],
    data: Annotated[Path, typer.Option(help="a text file (perplexity) or a .jsonl of the task's records")],
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the results (default CKPT/eval-TASK.json)")] = None,
    max_tokens: Annotated[int, typer.Option(help="longest generated answer in tokens")] = ANSWER_MAX_TOKENS,
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
    max_tokens: Annotated[int, typer.Option(help="longest task answer in tokens")] = ANSWER_MAX_TOKENS,
    limit: Annotated[Optional[int], typer.Option(help="score only the first N task records")] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples")] = 1000,
    seed: Annotated[int, typer.Option(help="seed for resampling and sampled answers")] = 0,
) -> None:
    """Evaluate checkpoints side by side (size, speed, bits/byte, task metrics with bootstrap intervals)."""
    from gptkit.evaluation.compare import CompareConfig, compare as run, last_line

    cfg = CompareConfig(data=data, tasks=tasks, task=task, prompts=prompts, out=out, max_tokens=max_tokens,
                        limit=limit, bootstrap=bootstrap, seed=seed)
    s = run(ckpts, cfg, log=lambda m: typer.echo(m, err=True))
    report = (out / "report.md").read_text(encoding="utf-8")
    typer.echo(report.split("## Examples where")[0].split("## Answers")[0].rstrip())  # the rest: in the files
    typer.echo(f"wrote {out / 'index.html'}, {out / 'report.md'}, {out / 'results.json'}")
    typer.echo(json.dumps(last_line(s)))


probe_app = typer.Typer(cls=Commands, no_args_is_help=True, help="Probe a model's likelihoods.")
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
