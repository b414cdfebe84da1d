"""The routed adapter as vLLM runs it by default, compiled with torch.compile, replies as PEFT's routed model.
Its own module so that a pytest worker of its own can take it (its compilation is the vLLM suite's longest
step: scripts/run-tests.sh, `--dist loadfile`); the helpers: tests/test_vllm.py.

Runs only in the vLLM venv: `python -m pytest -m vllm tests/test_vllm_compiled.py`.
"""

from __future__ import annotations

import pytest
from test_vllm import assert_same_replies, routed_case, served_by_vllm

pytestmark = pytest.mark.vllm


def test_routed_adapter_compiled_by_vllm(tmp_path):
    """vLLM's default: the forward hooks traced by torch.compile (Llama, dense routing)."""
    base, adapter, prompts, expected, unadapted = routed_case(tmp_path, "llama")
    assert_same_replies(served_by_vllm(tmp_path, base, prompts, 16, routed=adapter, compiled=True), expected, unadapted)
