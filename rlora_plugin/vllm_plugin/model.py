"""vLLM's Llama and Qwen2 models with an R-LoRA adapter routed in their forward.

At load, after vLLM has loaded the base weights, every adapted layer gets a forward hook that adds the routed
update (`rlora_plugin.layer.routed_update`, the one source of the math) to the slices of its fused output that
PEFT's targets fill: `qkv_proj` packs `q_proj, k_proj, v_proj`, `gate_up_proj` packs `gate_proj, up_proj`
(the model's `packed_modules_mapping`). The frozen offset path of `init: random` is the constant matrix
`s * mean_i(B_i^0) A^0`: it is subtracted from the base weight once, so per token only the trainable adapter
weights are read. The adapter's tensors stay in fp32 as in PEFT (the update is added in the model's dtype).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.model_loader import get_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from ..config import RLoraConfig
from ..layer import adapter_scaling, fold_offsets, routed_update, top_k_gates
from ..patching import HostChanged, private_attribute
from ..routing import PEFT_PREFIX
from ..saved import CONFIG, WEIGHTS, read_adapter
from . import ADAPTER_KEY, ARCHITECTURES, CHECKED, refusal, routed_architecture


def adapter_dir(source: str) -> Path:
    """A local adapter directory as it is, or a model-hub id's snapshot (from the hub cache when offline)."""
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=[CONFIG, WEIGHTS]))
    except Exception as error:  # noqa: BLE001  (not a directory, not on the hub, not in the cache offline)
        raise refusal(
            f"`{ADAPTER_KEY}: {source}` is neither a directory nor a model-hub id that could be fetched ({error})",
            "give the directory of a saved R-LoRA adapter or its hub id",
        ) from error


class RoutedPart(nn.Module):
    """One PEFT target inside a vLLM layer: its adapter weights and the slice `[start, stop)` of the output."""

    def __init__(self, weights: dict[str, torch.Tensor], config: RLoraConfig, start: int, stop: int) -> None:
        super().__init__()
        self.register_buffer("lora_a", weights["A"], persistent=False)
        self.register_buffer("lora_b", weights["B"], persistent=False)
        self.register_buffer("router", weights.get("router"), persistent=False)  # none for one head
        self.start, self.stop = start, stop
        self.update = partial(
            routed_update, scaling=adapter_scaling(config),
            temperature=config.router_temperature, route=self.gates,
        )  # fmt: skip
        self.top_k = config.router_top_k

    def gates(self, probs: torch.Tensor) -> torch.Tensor:
        return top_k_gates(probs, self.top_k)[0]

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> None:
        update = self.update(x.to(self.lora_a.dtype), self.lora_a, self.lora_b, self.router)
        output[..., self.start : self.stop] += update.to(output.dtype)


def add_routed_update(layer: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Forward hook of an adapted vLLM linear layer (which returns `(output, bias)` or `output`)."""
    result = output[0] if isinstance(output, tuple) else output
    for part in layer.rlora_parts:
        part.add_to(result, args[0])
    return output


class RoutedAdapter:
    """Mixin of the R-LoRA architectures: refuses what it cannot serve exactly before any weight is loaded, and
    attaches the adapter once the base weights are."""

    model_types: tuple[str, ...]  # the base configs' `model_type`s this family serves

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # noqa: ANN001
        hf_config = vllm_config.model_config.hf_config
        name = type(self).__name__
        source = getattr(hf_config, ADAPTER_KEY, None)
        if not isinstance(source, str) or not source:
            raise refusal(
                f"the `{name}` architecture needs one adapter, `{ADAPTER_KEY}` in --hf-overrides, got {source!r}",
                f'--hf-overrides \'{{"architectures": ["{name}"], "{ADAPTER_KEY}": "ADAPTER_DIR_OR_HUB_ID"}}\' '
                "(one R-LoRA adapter per server)",
            )
        if hf_config.model_type not in self.model_types:
            ours = routed_architecture(hf_config.architectures)
            raise refusal(
                f"`{name}` serves {'/'.join(self.model_types)} bases, but this base's model_type is "
                f"`{hf_config.model_type}`",
                f"name {ours or 'the R-LoRA architecture of its family'} in --hf-overrides' "
                f"`architectures` (supported: {', '.join(ARCHITECTURES.values())})",
            )
        parallel = vllm_config.parallel_config
        for key, size in (
            ("tensor_parallel_size", parallel.tensor_parallel_size),
            ("pipeline_parallel_size", parallel.pipeline_parallel_size),
        ):
            if size > 1:
                raise refusal(f"`{key}: {size}` is not supported yet", f"serve on one device ({key} 1)")
        if vllm_config.quant_config is not None:
            raise refusal(
                f"a quantized base (`quantization: {vllm_config.model_config.quantization}`) is not supported yet",
                "serve an unquantized base, or the frozen-gate export as a plain LoRA",
            )
        if vllm_config.lora_config is not None:
            raise refusal(
                "`enable_lora` cannot be combined with the routed adapter (vLLM's LoRA layers would replace the "
                "hooked ones)",
                "drop --enable-lora; serve other LoRAs from another server",
            )
        load_format = vllm_config.load_config.load_format
        if not isinstance(get_model_loader(vllm_config.load_config), DefaultModelLoader):
            raise refusal(
                f"`load_format: {load_format}` does not load weights through the model (where the adapter is attached)",
                "use load_format auto (or safetensors, pt)",
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.rlora_source, self.rlora_attached, self.rlora_hf_config = source, False, hf_config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.rlora_attached:
            raise refusal(
                "reloading weights into a model with a routed adapter is not supported (its offset is folded "
                "into the base weights at load)",
                "start a new server to serve new weights",
            )
        loaded = super().load_weights(weights)
        directory = adapter_dir(self.rlora_source)
        self.attach_adapter(directory)
        # vLLM's torch.compile cache is keyed by the model config: the adapter's content goes into it, since the
        # compiled graph holds its settings (scaling, top-k, temperature) as constants.
        digest = hashlib.sha256()
        for name in (CONFIG, WEIGHTS):
            digest.update((directory / name).read_bytes())
        self.rlora_hf_config.rlora_adapter_sha256 = digest.hexdigest()
        return loaded

    @torch.no_grad()
    def attach_adapter(self, directory: Path) -> None:
        config, modules, others = read_adapter(directory)
        layers = dict(self.named_modules())
        targets = {key: self.vllm_target(key.removeprefix(PEFT_PREFIX), layers) for key in modules}
        if others:
            raise refusal(
                f"the adapter saves full tensors besides its R-LoRA layers ({', '.join(sorted(others)[:3])}; "
                "e.g. `modules_to_save`), which the plugin does not serve",
                "train without modules_to_save, or serve the adapter with PEFT",
            )
        for key, weights in modules.items():
            vllm_name, part = targets[key]
            layer = layers[vllm_name]
            sizes = self.output_sizes(layer)
            start = sum(sizes[:part])
            stop = start + sizes[part]
            expected = (config.r, layer.input_size), (sizes[part], config.num_heads * config.r)
            if (tuple(weights["A"].shape), tuple(weights["B"].shape)) != expected:
                raise refusal(
                    f"the adapter's `{key}` has A {tuple(weights['A'].shape)}, B {tuple(weights['B'].shape)}, but "
                    f"this base's layer needs {expected[0]}, {expected[1]}",
                    "serve the adapter on the base model it was trained on",
                )
            if "offset_A" in weights:  # fold -s * Bbar0 A0 into the base rows, in fp32
                base = layer.weight.data[start:stop]
                base.copy_(fold_offsets(base, [(adapter_scaling(config), weights["offset_A"], weights["offset_B"])]))
            if not hasattr(layer, "rlora_parts"):
                layer.rlora_parts = nn.ModuleList()
                layer.register_forward_hook(add_routed_update)
            layer.rlora_parts.append(RoutedPart(weights, config, start, stop).to(layer.weight.device))
        self.rlora_attached = True

    @staticmethod
    def output_sizes(layer: nn.Module) -> list[int]:
        """The sizes of the parts of a vLLM linear layer's fused output (e.g. q, k, v), checked against its
        weight's rows (with one device, a layer's partition is the whole layer)."""
        sizes = private_attribute(layer, "output_partition_sizes", list, CHECKED)
        weight = private_attribute(layer, "weight", torch.Tensor, CHECKED)
        private_attribute(layer, "input_size", int, CHECKED)
        if sum(sizes) != weight.shape[0]:
            raise HostChanged(
                CHECKED, f"`{type(layer).__name__}.output_partition_sizes` {sizes} to add up to its weight's rows "
                f"({weight.shape[0]})",
            )  # fmt: skip
        return sizes

    def vllm_target(self, name: str, layers: dict[str, nn.Module]) -> tuple[str, int]:
        """PEFT's module name -> vLLM's module and the index of its part in that module's fused output."""
        parent, _, leaf = name.rpartition(".")
        packed_modules = private_attribute(self, "packed_modules_mapping", dict, CHECKED)
        for packed, leaves in packed_modules.items():
            if leaf in leaves:
                vllm_name, part = f"{parent}.{packed}", leaves.index(leaf)
                break
        else:
            vllm_name, part = name, 0
        if vllm_name not in layers or not isinstance(layers[vllm_name], LinearBase):
            raise refusal(
                f"the adapter targets `{name}`, which is not a linear layer of this vLLM model",
                "serve an adapter of the attention and MLP projections (q/k/v/o, gate/up/down), or the "
                "frozen-gate export as a plain LoRA",
            )
        return vllm_name, part


class RLoraLlamaForCausalLM(RoutedAdapter, LlamaForCausalLM):
    model_types = ("llama",)


class RLoraQwen2ForCausalLM(RoutedAdapter, Qwen2ForCausalLM):
    model_types = ("qwen2",)
