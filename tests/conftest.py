"""Shared fixtures: offline tiny model/tokenizer/datasets (see benchmarks/tiny_assets.py), built once per session."""

from __future__ import annotations

import pytest

from benchmarks import tiny_assets


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of a tiny random Llama with its tokenizer (`model`) and two jsonl datasets (`alpaca`, `chat`)."""
    return tiny_assets.build_assets(tmp_path_factory.mktemp("tiny_assets"))


HOST_MARKERS = ("llamafactory", "vllm", "ms_swift")  # tests that need a host installed only in its own venv


def pytest_collection_modifyitems(config, items):
    """The `llamafactory`, `vllm` and `ms_swift` tests need a venv with that host: they run only when `-m` names their
    marker (`python -m pytest -m llamafactory tests/test_llamafactory.py`), never as part of another selection
    such as `-m "not cli"` (deselected, not skipped: nothing counts them as passed)."""
    named = config.getoption("markexpr") or ""
    hosts = [marker for marker in HOST_MARKERS if marker not in named]
    # markers, not `item.keywords`: those also hold the names of the enclosing directories (a checkout named vllm)
    deselected = [item for item in items if any(item.get_closest_marker(marker) for marker in hosts)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
