"""`gptkit <command>`: one Typer app (cli/common.py); each module here registers one group of commands.

Commands are thin typed functions: they parse options, call one stage, and print a short summary.
They import their stage inside the function body, the one place in gptkit where internal imports do
not stand at the top of a module, for a reason: `gptkit --help` and `gptkit info` never import torch
(a few seconds on a small machine; the help takes a fraction of one).
"""

from gptkit.cli import convert, data, evaluation, generate, info, recipes, serve, train  # noqa: F401  (they register)
from gptkit.cli.common import app, main

__all__ = ["app", "main"]
