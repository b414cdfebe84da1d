"""R-LoRA's routed adapter inside vLLM: the per-token router and every head in vLLM's own model forward, with
vLLM's scheduler, paged KV cache and continuous batching doing the rest (docs/export-and-serving.md).

    vllm serve BASE --hf-overrides '{"architectures": ["RLoraLlamaForCausalLM"], "rlora_adapter": "ADAPTER"}'

`ADAPTER` is a saved R-LoRA adapter directory or a model-hub id. vLLM loads this package's `register` in every
process from the `vllm.general_plugins` entry point; it adds one architecture per supported family
(`ARCHITECTURES`), which `--hf-overrides` selects in place of the base model's.
"""

from __future__ import annotations

# The base model's architecture (its config.json) -> the R-LoRA architecture to name in --hf-overrides.
ARCHITECTURES = {"LlamaForCausalLM": "RLoraLlamaForCausalLM", "Qwen2ForCausalLM": "RLoraQwen2ForCausalLM"}
ADAPTER_KEY = "rlora_adapter"  # the --hf-overrides key that names the adapter


def register() -> None:
    """vLLM's `vllm.general_plugins` hook: make the R-LoRA architectures known to vLLM's model registry."""
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, f"rlora_plugin.vllm_plugin.model:{architecture}")


def hf_overrides(adapter: str, base_architecture: str) -> dict:
    """The `hf_overrides` (`--hf-overrides` JSON) that serve `adapter` on a base of `base_architecture`."""
    if base_architecture not in ARCHITECTURES:
        raise ValueError(
            f"vLLM R-LoRA: a `{base_architecture}` base is not supported; the supported architectures are "
            f"{', '.join(ARCHITECTURES)}. Fix: serve the frozen-gate export as a plain LoRA instead "
            "(docs/export-and-serving.md)."
        )
    return {"architectures": [ARCHITECTURES[base_architecture]], ADAPTER_KEY: str(adapter)}
