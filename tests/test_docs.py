"""The docs' console examples that need nothing before them, run again: their output must be what the
page shows. Every `$ gptkit ...` line of README.md and docs/*.md whose command is in CHEAP is run in
process; its pasted output (the lines up to the next `$` line or the block's end) must match line by
line, where a pasted `...` stands for lines left out. The other examples need a trained model or data
made before them (they were run and pasted by hand, and name the machine where timing matters)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptkit.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# commands whose output depends on nothing but their arguments (no model, data or clock)
CHEAP = re.compile(r"^gptkit (info --preset \S+( --world-size \d+)?|--version)$")


def examples() -> list[tuple[str, str, list[str]]]:
    """(page, command, pasted output lines) for each cheap example."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```console\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            lines = block.splitlines()
            for i, line in enumerate(lines):
                command = line[2:].strip() if line.startswith("$ ") else ""
                if CHEAP.match(command):
                    out = []
                    for rest in lines[i + 1:]:
                        if rest.startswith("$ "):
                            break
                        out.append(rest)
                    found.append((page.name, command, out))
    return found


def matches(pasted: list[str], real: list[str]) -> bool:
    """Line by line; a pasted '...' matches any run of lines (including none)."""
    if not pasted:
        return not real
    if pasted[0] == "...":
        return any(matches(pasted[1:], real[k:]) for k in range(len(real) + 1))
    return bool(real) and pasted[0] == real[0] and matches(pasted[1:], real[1:])


def test_the_docs_have_cheap_examples():
    pages = {page for page, _, _ in examples()}
    assert {"README.md", "training.md"} <= pages


@pytest.mark.parametrize("page, command, pasted", examples(), ids=lambda v: v if isinstance(v, str) else None)
def test_a_cheap_example_prints_what_the_docs_show(page, command, pasted):
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    real = result.output.rstrip("\n").splitlines()
    assert matches(pasted, real), f"{page}: `{command}` now prints:\n{result.output}"


def test_pasted_output_is_compared_line_by_line():
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"]) and matches(["a", "..."], ["a"])
    assert not matches(["a", "b"], ["a", "c"]) and not matches(["a"], ["a", "b"]) and not matches(["...", "x"], ["y"])
