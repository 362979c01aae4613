"""`gptkit <command>`: one typer app; each module here registers its group of commands on it."""

from gptkit.cli import commands, serve  # noqa: F401  (importing a module registers its commands)
from gptkit.cli.commands import app, main

__all__ = ["app", "main"]
