"""`gptkit serve` and `gptkit keys`: the server's commands, registered on the one CLI app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gptkit.cli.common import Commands, app, engine_for, fail


# ---------------------------------------------------------------------------- serve
def _model_specs(ckpt: Path, name: Optional[str], extra: list[str]) -> list[tuple[str, Path]]:
    """(name, checkpoint) pairs: CKPT as --name (default: its folder name), then each NAME=CKPT."""
    specs = [(name or ckpt.resolve().name, ckpt)]
    for spec in extra:
        model_name, sep, path = spec.partition("=")
        if not sep or not model_name or not path:
            fail(f"--model {spec!r}: expected NAME=CKPT")
        specs.append((model_name, Path(path)))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        fail(f"model names must be unique, got {', '.join(names)} (use --name for CKPT)")
    return specs


@app.command()
def serve(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder of the first model")],
    name: Annotated[Optional[str], typer.Option(help="model name for CKPT (default: its folder)")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="another model, NAME=CKPT (repeatable)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="GPTKIT_API_KEY", show_envvar=True,
        help="require `Authorization: Bearer KEY` (one key, named `default`, no limits)")] = None,
    api_keys_file: Annotated[Optional[Path], typer.Option(
        help="JSONL of hashed keys with models and limits (make one with `gptkit keys add`)")] = None,
    public_metrics: Annotated[bool, typer.Option(help="serve /metrics without a key")] = False,
    moderation: Annotated[Optional[Path], typer.Option(
        help="classifier checkpoint (`gptkit finetune --task classify`) for /v1/moderations and --moderate")] = None,
    moderation_blocklist: Annotated[Optional[Path], typer.Option(
        help="file of terms, one a line, that flag the category `blocklist`")] = None,
    moderate: Annotated[str, typer.Option(help="what moderation checks: input, output or input,output")
                        ] = "input,output",
    moderation_threshold: Annotated[Optional[list[str]], typer.Option(
        help="flag at this probability: CATEGORY=P, or P for every category (default 0.5; repeatable)")] = None,
    moderation_safe_labels: Annotated[str, typer.Option(help="classifier labels that are not categories")] = "ok",
    moderation_every: Annotated[int, typer.Option(help="output tokens between moderation checks")] = 16,
    audit_log: Annotated[Optional[Path], typer.Option(help="append one JSON line per request to this file")] = None,
    audit_log_text: Annotated[bool, typer.Option(help="include prompt and completion text in the audit log")
                              ] = False,
    audit_log_max_bytes: Annotated[int, typer.Option(help="rotate the audit log at this size")] = 100 * 2**20,
    audit_log_backups: Annotated[int, typer.Option(help="rotated audit logs kept (FILE.1 ...)")] = 5,
    max_batch: Annotated[int, typer.Option(help="sequences decoded together per model")] = 8,
    prefix_cache_mb: Annotated[float, typer.Option(help="MiB of prompt-prefix keys and values kept per model for "
                                                        "requests that start alike (0: off)")] = 256,
    max_queue: Annotated[int, typer.Option(help="sequences (prompts x n) waiting for a slot per model before 429")] = 64,
    max_body: Annotated[int, typer.Option(help="largest request body in bytes (413 above)")] = 4 * 2**20,
    max_stop: Annotated[int, typer.Option(help="stop strings per request")] = 4,
    max_stop_chars: Annotated[int, typer.Option(help="characters per stop string")] = 256,
    max_prompts: Annotated[int, typer.Option(help="prompts in one /v1/completions request")] = 64,
    max_request_tokens: Annotated[int, typer.Option(help="prompts x n x max_tokens one request may ask for")] = 32768,
    max_moderation_chars: Annotated[int, typer.Option(help="characters of all texts of one /v1/moderations "
                                                           "request")] = 65536,
    max_attention_tokens: Annotated[int, typer.Option(help="tokens of text /v1/attention runs (its answer grows "
                                                           "with heads x tokens^2)")] = 256,
    chat_template: Annotated[str, typer.Option(help="auto | chatml | plain: auto is the checkpoint's template, "
                                                    "else ChatML when the tokenizer has its tokens, else plain "
                                                    "text")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16")] = "float32",
    quantize: Annotated[Optional[str], typer.Option(help="int8: weight-only int8 quantisation")] = None,
) -> None:
    """Serve checkpoints with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, streaming)."""
    import uvicorn

    from gptkit.inference.threads import serial_main_thread
    from gptkit.server import ServedModel, ServerConfig, create_app
    from gptkit.server.errors import JSONErrorProtocol
    from gptkit.server.limits import Limits

    serial_main_thread()  # the engines decode on their own threads; see its docstring

    if max_queue < 1 or max_body < 1:
        fail(f"--max-queue {max_queue} and --max-body {max_body} must be at least 1")
    limits = Limits(max_stop, max_stop_chars, max_prompts, max_request_tokens, max_moderation_chars,
                    max_attention_tokens)
    served = []
    for model_name, path in _model_specs(ckpt, name, model or []):
        engine, tokenizer = engine_for(path, max_batch=max_batch, quantize=quantize, dtype=dtype,
                                       prefix_cache_mb=prefix_cache_mb)
        served.append(ServedModel(model_name, engine, tokenizer, chat_template=chat_template))
    config = ServerConfig(api_key=api_key or None, max_queue=max_queue, max_body=max_body, limits=limits,
                          public_metrics=public_metrics, **_safety_options(
                              api_keys_file, moderation, moderation_blocklist, moderate, moderation_threshold or [],
                              moderation_safe_labels, moderation_every, audit_log, audit_log_text,
                              audit_log_max_bytes, audit_log_backups))
    server_app = create_app(served, config)
    keys = len(config.api_keys) + bool(config.api_key)
    templates = ", ".join(f"{m.name}: {m.tokenizer.chat_template.kind} ({m.chat_template})" for m in served)
    typer.echo(f"serving {', '.join(m.name for m in served)} on http://{host}:{port}/v1 "
               f"({f'{keys} API key(s)' if keys else 'no API key'}"
               f"{f', moderation: {moderate}' if config.moderator else ''}"
               f"{f', audit log {audit_log}' if audit_log else ''}; chat template {templates}); Ctrl-C stops",
               err=True)
    uvicorn.run(server_app, host=host, port=port, log_level="warning", http=JSONErrorProtocol)


def _safety_options(keys_file, moderation, blocklist, moderate, thresholds, safe_labels, every, audit_log,
                    audit_text, audit_max_bytes, audit_backups) -> dict:
    """ServerConfig fields for keys, moderation and the audit log, from serve's options."""
    from gptkit.server.audit import AuditLog
    from gptkit.server.auth import load_keys
    from gptkit.server.moderation import ModerationConfig, Moderator, parse_moderate, parse_thresholds

    out: dict = {"api_keys": load_keys(keys_file) if keys_file else []}
    if moderation or blocklist:
        if every < 1:
            fail(f"--moderation-every {every} must be at least 1")
        default, per = parse_thresholds(thresholds)
        check_input, check_output = parse_moderate(moderate)
        out["moderator"] = Moderator(ModerationConfig(
            ckpt=str(moderation) if moderation else None, blocklist=str(blocklist) if blocklist else None,
            moderate_input=check_input, moderate_output=check_output, thresholds=per,
            threshold=0.5 if default is None else default, check_every=every,
            safe_labels=tuple(s.strip() for s in safe_labels.split(",") if s.strip())))
    if audit_log:
        if audit_max_bytes < 1 or audit_backups < 0:
            fail(f"--audit-log-max-bytes {audit_max_bytes} must be >= 1 and --audit-log-backups {audit_backups} >= 0")
        out["audit"] = AuditLog(audit_log, audit_max_bytes, audit_backups, text=audit_text)
    return out


keys_app = typer.Typer(cls=Commands, no_args_is_help=True, help="Make API keys for `gptkit serve --api-keys-file`.")
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="the key's name (shown in metrics and the audit log)")],
    file: Annotated[Path, typer.Option(help="the keys file to append to (created if missing)")] = Path("keys.jsonl"),
    models: Annotated[Optional[str], typer.Option(help="comma-separated models the key may use (default: all)")
                      ] = None,
    rpm: Annotated[Optional[int], typer.Option(help="requests per minute (default: no limit)")] = None,
    tpm: Annotated[Optional[int], typer.Option(help="tokens per minute, prompt + completion (default: no limit)")
                   ] = None,
    concurrent: Annotated[Optional[int], typer.Option(help="requests in flight (default: no limit)")] = None,
    admin: Annotated[bool, typer.Option(help="may read /metrics (every key's name and traffic)")] = False,
) -> None:
    """Make a key, store its SHA-256 in FILE, and print the key: it is shown only this once."""
    from gptkit.server.auth import add_key
    from gptkit.server.ratelimit import KeyLimits

    for option, value in (("--rpm", rpm), ("--tpm", tpm), ("--concurrent", concurrent)):
        if value is not None and value < 1:
            fail(f"{option} {value}: expected a positive integer (leave it out for no limit)")
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models else None
    key = add_key(file, name, model_list, KeyLimits(rpm, tpm, concurrent), admin)
    typer.echo(f"added key {name!r} to {file}; the key (shown only now):", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    file: Annotated[Path, typer.Option(help="the keys file")] = Path("keys.jsonl"),
) -> None:
    """The keys in FILE: name, models and limits (never a key: only its hash is stored)."""
    from gptkit.server.auth import load_keys

    if not file.is_file():
        fail(f"{file}: no such keys file (make one with `gptkit keys add NAME --file {file}`)")
    for k in load_keys(file):
        limits = [f"{label} {v}" for label, v in (("rpm", k.limits.requests_per_minute),
                                                  ("tpm", k.limits.tokens_per_minute),
                                                  ("concurrent", k.limits.concurrent_requests)) if v is not None]
        typer.echo(f"{k.name}\tmodels: {', '.join(sorted(k.models)) if k.models else 'all'}\t"
                   f"limits: {', '.join(limits) or 'none'}" + ("\tadmin" if k.admin else ""))


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="the name of the key to remove")],
    file: Annotated[Path, typer.Option(help="the keys file")] = Path("keys.jsonl"),
) -> None:
    """Remove a key from FILE. A running server reads the file when it starts: restart it."""
    from gptkit.server.auth import revoke_key

    revoke_key(file, name)
    typer.echo(f"revoked {name!r} in {file}; restart `gptkit serve` for it to take effect", err=True)
