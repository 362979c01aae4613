"""The package layout as a test: every internal import points down the pipeline, nothing imports in a
circle, imports stand at the top of modules, and no module grows past what one can read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gptkit"
BASE = {"errors", "config", "fileio", "device"}
# what each stage may import (besides itself); a stage never imports one above it
BELOW = {
    "errors": set(),
    "fileio": set(),
    "config": {"errors"},
    "device": {"errors"},
    "text": BASE,
    "model": {"errors", "config"},  # the model is math only: torch and its config
    "data": BASE | {"text"},
    "checkpoint": BASE | {"text", "model"},
    "training": BASE | {"text", "data", "model", "checkpoint"},
    "inference": BASE | {"text", "model", "checkpoint"},
    "evaluation": BASE | {"text", "data", "model", "checkpoint", "training", "inference"},
    "server": BASE | {"text", "model", "checkpoint", "inference", "evaluation"},
    "recipes": BASE | {"text", "data", "model", "checkpoint", "training", "inference", "evaluation"},
    "cli": BASE | {"text", "data", "model", "checkpoint", "training", "inference", "evaluation", "server", "recipes"},
    "__main__": {"cli"},
}
MAX_LINES = 420


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported gptkit module, at the top?, line) for each internal import of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            if base == "gptkit" or base.startswith("gptkit."):
                targets = [f"{base}.{a.name}" if base == "gptkit" or f"{base}.{a.name}" in MODULES else base
                           for a in node.names]
                found += [(t, id(node) in top, node.lineno) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top, node.lineno) for a in node.names if a.name.startswith("gptkit")]
    return found


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = modules()
GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_every_import_points_down_the_pipeline():
    wrong = [f"{name}:{line} imports {target}" for name, found in GRAPH.items() for target, _, line in found
             if stage(target) != stage(name) and stage(target) not in BELOW[stage(name)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = {name: {t for t, _, _ in found if t in MODULES and t != name} for name, found in GRAPH.items()}
    done, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(" -> ".join(on_path[on_path.index(node):] + [node]))
            return
        if node in done:
            return
        on_path.append(node)
        for nxt in sorted(edges[node]):
            visit(nxt)
        on_path.pop()
        done.add(node)

    for name in sorted(edges):
        visit(name)
    assert not cycles, "\n".join(cycles)


def test_internal_imports_stand_at_the_top():
    # the CLI's commands import their stage when they run, so that `--help` never imports torch
    inner = [f"{name}:{line} imports {target} inside a function" for name, found in GRAPH.items()
             for target, at_top, line in found if not at_top and stage(name) != "cli"]
    assert not inner, "\n".join(inner)


def test_the_cli_starts_without_torch():
    code = "import sys, gptkit.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines; split it by what it does (at most {MAX_LINES})"
