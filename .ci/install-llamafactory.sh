#!/usr/bin/env bash
# Install LLaMA-Factory into the active python:  install-llamafactory.sh [VERSION]   (default 0.9.5)
# LLaMA-Factory imports torchaudio at import time (llamafactory/data/mm_plugin.py) and pins
# torchaudio/torchvision without versions. No torchaudio on the package index loads against the CPU torch
# 2.13.0 of constraints.txt (torchaudio 2.11.1 fails with "Could not load ... _torchaudio.so"), and a
# torchvision that does not match torch breaks transformers' import ("operator torchvision::nms does not
# exist"). So this venv gets a matching trio from the index: torch 2.9.1 with torchvision 0.24.1 and
# torchaudio 2.9.1 (a CUDA build, about 7 GB, that runs on the CPU), installed before LLaMA-Factory so its
# unpinned torch requirements are already met. Do not pass constraints.txt here (it pins torch 2.13.0).
# DeepSpeed: LLaMA-Factory's wheel declares no extra for it; the requirements/deepspeed.txt of its 0.9.5 sdist
# asks for deepspeed>=0.10.0,<=0.18.4. 0.18.4 (the newest there) adds only itself, hjson, msgpack, ninja and
# py-cpuinfo to this venv (no other version changes) and runs ZeRO-2/3 on CPU under gloo with torch 2.9.1 (the
# first run JIT-builds deepspeed_shm_comm with g++). 0.19.x, which the Axolotl venvs use, is outside that range.
set -euo pipefail
version="${1:-0.9.5}"
pip=(python -m pip)

"${pip[@]}" install torch==2.9.1 torchvision==0.24.1
"${pip[@]}" install torch==2.9.1 torchaudio==2.9.1
"${pip[@]}" install torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1 "llamafactory==$version" deepspeed==0.18.4
python -c 'import torchaudio, torchvision, llamafactory.data, deepspeed  # the imports that break on a mismatched torch'
"${pip[@]}" check || true
