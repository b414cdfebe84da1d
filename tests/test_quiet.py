"""The import-time lines of other libraries that `import rlora_plugin` drops (rlora_plugin/quiet.py): gone from
its own programs and a user's, and nothing else those loggers say is dropped."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from tiny_models import model_with

from rlora_plugin import quiet

ALWAYS = ("is an Enum subclass and is now natively supported", "/torchao/_C_mxfp8", "/torchao/_C_cutlass_")


def python(*args: str) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process, which must succeed."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def noise(stderr: str) -> list[str]:
    """The lines of `stderr` that hold one of the dropped messages."""
    return [line for line in stderr.splitlines() if any(text in line for text in ALWAYS)]


@pytest.fixture(scope="module")
def baseline() -> list[str]:
    """What `import peft` prints here; the test means something only where the libraries print these lines."""
    lines = noise(python("-c", "import peft").stderr)
    if not lines:
        pytest.skip("this environment's torch, torchao and bitsandbytes print none of these lines")
    return lines


def test_the_report_prints_none_of_them(baseline, tmp_path):
    model_with().save_pretrained(tmp_path / "adapter")
    assert noise(python("-m", "rlora_plugin.report", str(tmp_path / "adapter")).stderr) == []


def test_a_library_import_drops_them(baseline):
    assert noise(python("-c", "import rlora_plugin").stderr) == []


def test_other_records_of_those_loggers_pass(caplog):
    import torch

    quiet.quiet_import_noise()
    quiet.quiet_import_noise()  # idempotent: one filter per logger
    assert sum(isinstance(f, quiet.DropRecords) for f in logging.getLogger("torchao").filters) == (
        torch.version.cuda is None and torch.version.hip is None
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C.abi3.so: undefined symbol")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.",
            logging.Logger,  # an enum of someone else's: its deprecation stays
        )
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: no CUDA")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [
        "Failed to load /x/torchao/_C.abi3.so: undefined symbol",
        f"{logging.Logger} is an Enum subclass and is now natively supported by torch.compile as an opaque value type.",
    ]
    assert len(messages) == (2 if torch.version.cuda is None and torch.version.hip is None else 3)
