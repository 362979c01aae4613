"""The recipes' fast versions, end to end, with loose thresholds (the full figures are in
BENCHMARKS.md). arithmetic, classify and multitask share one base model and reuse each
other's single-task runs, so they run in that order on one folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gptkit.cli import app
from gptkit.recipes import first_sentence, run_recipe, sums

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


def test_data_splits_hold_out_what_they_score():
    train, test = sums(20, seed=3)
    assert len(test) == 40 and not set(train) & set(test) and len(train) + len(test) == 400
    assert first_sentence("Return the sum.  More text.\n\nDetails") == "Return the sum."


def test_arithmetic_fast(out):
    m = run_recipe("arithmetic", out, fast=True, log=lambda s: None)
    assert m["base_exact_match"] < 0.2  # the base has seen "a+b=c", never the question
    assert m["full_exact_match"] >= 0.5
    assert m["lora_exact_match"] >= 0.3 and m["lora_trainable_fraction"] <= 0.05


def test_classify_fast(out):
    m = run_recipe("classify", out, fast=True, log=lambda s: None)
    assert m["accuracy"] >= m["majority_baseline"] + 0.1


def test_multitask_fast_from_the_cli(out):
    r = CliRunner().invoke(app, ["recipe", "multitask", "--fast", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output.strip().splitlines()[-1])  # the last line is the metrics
    assert m["exact_match"] >= m["single_task_exact_match"] - 0.25
    assert m["accuracy"] >= m["majority_baseline"] + 0.05


def test_docs_fast_beats_the_untuned_base(out):
    m = run_recipe("docs", out, fast=True, log=lambda s: None)
    assert m["tuned_rouge_l"] > m["base_rouge_l"] + 0.05
