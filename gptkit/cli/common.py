"""What every command shares: the one Typer app, the error policy, options generated from the
config dataclasses, and small output helpers.

Commands are thin: they parse options, call a stage module, and print a short summary.
A GptkitError (a user mistake) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
import typer.core

from gptkit.errors import GptkitError

# `gptkit --help` lists the commands in the order of the pipeline, not of this file.
ORDER = ["demo", "info", "train-tokenizer", "prepare", "pretrain", "generate", "finetune", "merge-lora",
         "chat", "evaluate", "compare", "probe", "attention", "serve", "keys", "import-hf", "export-hf", "recipe"]


class Commands(typer.core.TyperGroup):
    """Every command turns a GptkitError (a user mistake) into one line and exit code 2."""

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def get_params(self, ctx):
        return [_plain_metavar(p) for p in super().get_params(ctx)]

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None and not isinstance(command, Commands):  # its params, --help included
            params = command.get_params
            command.get_params = lambda ctx: [_plain_metavar(p) for p in params(ctx)]
        return command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GptkitError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None


def _plain_metavar(param):
    """Help as people write it: Typer 0.29 prints a required argument as {ckpt} in the usage line, a
    flag's type as <bool> and a repeatable option's as <list[str]>; here they are CKPT (or [CKPT]), no
    type for a flag (its --x/--no-x says it all) and the item's type for a repeatable option."""
    if isinstance(param, typer.core.TyperArgument):
        name = param.name.upper() + ("..." if param.nargs != 1 else "")
        param._usage_display_name = lambda: name if param.required else f"[{name}]"
        param._rich_display_name = lambda: name
    if isinstance(param, typer.core.TyperOption) and param.is_flag:
        param.display_type_rich = lambda ctx: None
    elif isinstance(param, (typer.core.TyperOption, typer.core.TyperArgument)) and param.metavar is None and (
            param.multiple or param.nargs != 1):
        shown = param.display_type
        param.display_type_rich = lambda ctx: shown(ctx).replace("list[", "").replace("]", "")
    return param


app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build your own GPT: tokenize, pretrain, fine-tune, evaluate, generate, serve.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import torch

        typer.echo(f"gptkit {version('gptkit')} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    no_verify: Annotated[bool, typer.Option("--no-verify", help="check checkpoint file sizes only, not their "
                                                                "sha256 (faster for huge checkpoints)")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print gptkit's and torch's versions and exit")] = False,
) -> None:
    """gptkit: build your own GPT end to end."""
    if no_verify:
        from gptkit.checkpoint.rundir import set_verify_hashes

        set_verify_hashes(False)


def config_options(cls: type, *, flags: dict[str, str] | None = None, into: str = "cfg",
                   overrides: bool = False, skip: tuple[str, ...] = ()):
    """Give a command one option per field of the dataclass `cls` (type, default and help from the
    field, declared once in gptkit.config), and hand it the built config as its `into` parameter.
    A new field appears in `--help` without another edit. flags renames options (out_dir: --out).
    With overrides, every option defaults to None and the command gets a dict of the options given
    (changes to a preset); skip leaves fields out."""
    flags = flags or {}
    hints = typing.get_type_hints(cls)

    def decorate(command):
        sig = inspect.signature(command)
        resolved = typing.get_type_hints(command, include_extras=True)  # the command's own, from their strings
        own = [p.replace(annotation=resolved.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name != into]
        fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]
        generated = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                       default=None if overrides else _default(f),
                                       annotation=Annotated[_cli_type(hints[f.name], overrides),
                                                            _option(f, flags, overrides)])
                     for f in fields]

        @functools.wraps(command)
        def run(**kwargs):
            given = {f.name: kwargs.pop(f.name) for f in fields}
            built = {k: v for k, v in given.items() if v is not None} if overrides else cls(**given)
            return command(**{into: built}, **kwargs)

        run.__signature__ = sig.replace(parameters=[*own, *generated])
        run.__annotations__ = {}  # Typer reads the signature above, not the command's own annotations
        return run

    return decorate


def field_option(cls: type, name: str) -> typer.models.OptionInfo:
    """One config field as an option of a command that is not built from the whole config (the demo's
    --optimizer): its help comes from the field; its default, after `=`, from the same class."""
    return typer.Option(help=cls.__dataclass_fields__[name].metadata["help"])


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _option(f: dataclasses.Field, flags: dict[str, str], overrides: bool = False) -> typer.models.OptionInfo:
    name = "--" + flags.get(f.name, f.name).replace("_", "-")
    if isinstance(f.default, bool):  # a flag, with its negation: --compile / --no-compile
        name += "/--no-" + name[2:]
    if overrides:
        return typer.Option(name, help=f"{f.metadata.get('help')} (unset: the preset's)", show_default=False)
    return typer.Option(name, help=f.metadata.get("help"), show_default=True)


def _cli_type(hint, optional: bool = False) -> type:
    """The type Typer parses: Literal choices as str (the config validates and names them in its
    help), `X | None` as Optional[X]; optional: every type as Optional."""
    if optional:
        return Optional[_cli_type(hint)]
    if typing.get_origin(hint) is Literal:
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        return Optional[args[0]]
    return hint


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def summary(s: dict, json_out: bool, line: str) -> None:
    """A command's result: one human line, or (--json) the whole summary as JSON."""
    typer.echo(json.dumps(s) if json_out else line)


# ---------------------------------------------------------------------------- generate / chat
def engine_for(ckpt: Path, max_batch: int = 8, quantize: Optional[str] = None, dtype: str = "float32",
               prefix_cache_mb: float = 0):
    """Load a checkpoint into the one inference engine; returns (engine, tokenizer)."""
    from gptkit.inference.factory import open_engine

    engine, loaded = open_engine(ckpt, max_batch=max_batch, quantize=quantize, dtype=dtype,
                                 prefix_cache_mb=prefix_cache_mb)
    return engine, loaded.tokenizer


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def gib(n: float) -> str:
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
