"""Shared fixtures: tiny models, tokenizers and corpora built on the spot (no downloads)."""

from __future__ import annotations

import os

import pytest

# Two cores shared by the suite's processes: one torch thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SAMPLE_TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "The quick brown fox jumps over the lazy dog. 我有一个梦想。 Emoji: 👍🏽🎉\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"
) * 20


@pytest.fixture(scope="session")
def sample_text() -> str:
    return SAMPLE_TEXT
