"""Shared fixtures: offline tiny model/tokenizer/datasets (see benchmarks/tiny_assets.py), built once per session."""

from __future__ import annotations

import pytest

from benchmarks import tiny_assets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of a tiny random Llama with its tokenizer (`model`) and two jsonl datasets (`alpaca`, `chat`)."""
    return tiny_assets.build_assets(tmp_path_factory.mktemp("tiny_assets"))


def pytest_collection_modifyitems(config, items):
    """The `llamafactory` tests need a venv with LLaMA-Factory: they run only when `-m` names their marker
    (`python -m pytest -m llamafactory tests/test_llamafactory.py`), never as part of another selection
    such as `-m "not cli"`."""
    if "llamafactory" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if "llamafactory" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "llamafactory" not in item.keywords]
