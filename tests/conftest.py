"""Shared fixtures: tiny random-init MoE models saved to disk and loaded back (the real path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SARA_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CORPUS = REPO / "examples" / "parallel.jsonl"


@pytest.fixture(scope="session")
def example_corpus() -> Path:
    return EXAMPLE_CORPUS


@pytest.fixture(scope="session")
def example_texts():
    from sara_moe.data.corpus import read_corpus, render_plain

    return [render_plain(v) for g in read_corpus(EXAMPLE_CORPUS) for v in g.texts.values()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, example_texts):
    """`tiny_model_dir(arch)` -> directory with a saved tiny model + tokenizer of that family."""
    from sara_moe.architectures.tiny import save_tiny

    cache: dict[str, Path] = {}

    def make(arch: str = "qwen3_moe") -> Path:
        if arch not in cache:
            cache[arch] = save_tiny(arch, tmp_path_factory.mktemp(f"tiny_{arch}"), example_texts, vocab_size=600)
        return cache[arch]

    return make
