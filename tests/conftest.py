"""Shared fixtures: offline tiny model/tokenizer/datasets (see benchmarks/tiny_assets.py), built once per session."""

from __future__ import annotations

import pytest

from benchmarks import tiny_assets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of a tiny random Llama with its tokenizer (`model`) and two jsonl datasets (`alpaca`, `chat`)."""
    return tiny_assets.build_assets(tmp_path_factory.mktemp("tiny_assets"))
