"""PEFT's own test suite, fetched from the sdist of the installed peft version (the sdist ships `tests/`).

The tests are not copied into this repository: `load()` downloads the sdist once with pip, unpacks its
`tests/` into a cache as the package `peft_upstream_tests`, and imports it. The cache is
`.pytest_cache/d/peft-sdist/` (gitignored), or the directory in `RLORA_PEFT_SDIST_CACHE`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

PACKAGE = "peft_upstream_tests"
CACHE = Path(
    os.environ.get("RLORA_PEFT_SDIST_CACHE") or Path(__file__).resolve().parents[1] / ".pytest_cache/d/peft-sdist"
)


def fetch(version: str) -> Path:
    """The directory holding `peft_upstream_tests/` (PEFT `version`'s tests), downloaded on first use."""
    root = CACHE / f"peft-{version}"
    if (root / PACKAGE / "testing_common.py").is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}"]
        done = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("peft-*.tar.gz"))
        if done.returncode or not sdists:
            raise RuntimeError(
                f"Could not download the sdist of peft=={version} (`{' '.join(cmd)}`, exit {done.returncode}); "
                f"PEFT's test suite comes from it, so the package index must be reachable:\n{done.stderr[-2000:]}"
            )
        staged = Path(tmp) / "staged"
        prefix = f"peft-{version}/tests/"
        with tarfile.open(sdists[0]) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            sdist.extractall(staged / PACKAGE, members=members, filter="data")
        if not (staged / PACKAGE / "testing_common.py").is_file():
            raise RuntimeError(f"The sdist of peft=={version} has no testing_common.py in its tests.")
        (staged / PACKAGE / "__init__.py").touch()
        shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(staged, root)
        except OSError:  # another test run unpacked it at the same moment
            if not (root / PACKAGE / "testing_common.py").is_file():
                raise
    return root


def tiny_causal_lm() -> Path:
    """A tiny random Llama saved in the cache: the local stand-in for the hub models of PEFT's decoder tests."""
    import transformers
    from tiny_models import tiny_llama

    # No "llama" in the path: PEFT's decoder tests skip every method's merge tests on a model id with "llama"
    # (a check meant for BEFT only).
    path = CACHE / f"tiny-causal-lm-transformers-{transformers.__version__}"
    if not (path / "config.json").is_file():
        tiny_llama().save_pretrained(path)
    return path


def load(module: str = "test_custom_models") -> types.ModuleType:
    """Import `module` of the installed peft version's test suite."""
    root = fetch(importlib.metadata.version("peft"))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if importlib.util.find_spec("diffusers") is not None:
        return importlib.import_module(f"{PACKAGE}.{module}")
    # testing_common imports diffusers only to recognize a StableDiffusionPipeline (never built here): lend it a
    # stand-in for the import, then take it away so nothing else believes diffusers is installed.
    stub = types.ModuleType("diffusers")
    stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = stub
    try:
        return importlib.import_module(f"{PACKAGE}.{module}")
    finally:
        del sys.modules["diffusers"]
