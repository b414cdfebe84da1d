"""A model-hub cache holding an adapter as `huggingface_hub` lays one out after a download, so that tests load
an adapter by its hub id with no network (the hub libraries read the cache when offline)."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_as_downloaded(adapter_dir: Path, repo_id: str, cache_dir: Path) -> None:
    """`adapter_dir`'s files as the `main` revision of the model repo `repo_id` in the hub cache `cache_dir`."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(adapter_dir, repo / "snapshots" / COMMIT)
