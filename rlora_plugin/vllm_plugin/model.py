"""vLLM's own model of the base, with an R-LoRA adapter routed in its forward.

`RLoraForCausalLM`, the architecture named in --hf-overrides, builds the routed subclass of the vLLM class that
serves the base (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, ...: any text model whose PEFT targets are vLLM
linear layers). At load, after vLLM has loaded the base weights, every adapted layer gets a forward hook that adds
the routed update (`rlora_plugin.layer.routed_update`, the one source of the math) to the rows of its output
that PEFT's target fills: `qkv_proj` packs `q_proj, k_proj, v_proj`, `gate_up_proj` packs `gate_proj, up_proj`
(the model's `packed_modules_mapping`). Under tensor parallelism each rank keeps its slice of the adapter, cut by
the layer's own weight loader as the base weight is: the heads' rows on column-parallel layers; the columns of
`A` and the router on row-parallel layers, whose down-projection is then summed over the ranks before the
softmax. The frozen offset path of `init: random` (the constant `s * mean_i(B_i^0) A^0`) is subtracted from the
base weight once, as PEFT does in its forwards without gradients, so per token only the trainable adapter weights
are read. A quantized weight cannot absorb it exactly: on a quantized base (compressed-tensors' int8 W8A8, the one
tested) the offset stays `r` more columns of the adapter's own product, as PEFT keeps it on a quantized layer. The
adapter runs in the model's dtype, the router's softmax in fp32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from functools import cache, partial
from pathlib import Path

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
    CompressedTensorsLinearMethod,
)
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
    CompressedTensorsScheme,
    CompressedTensorsW8A8Int8,
)
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.model_executor.layers.quantization.online.base import OnlineQuantizationConfig
from vllm.model_executor.model_loader import get_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.interfaces import has_inner_state, is_attention_free, is_hybrid, supports_multimodal
from vllm.model_executor.models.interfaces_base import is_text_generation_model
from vllm.model_executor.models.llama import LlamaForCausalLM

from ..config import RLoraConfig
from ..layer import adapter_scaling, fold_offsets, routed_update, top_k_gates
from ..patching import HostChanged, private_attribute
from ..routing import PEFT_PREFIX
from ..saved import CONFIG, WEIGHTS, read_adapter
from . import ADAPTER_KEY, ARCHITECTURE, CHECKED, refusal

EXPORT_FIX = "serve the frozen-gate export as a plain LoRA (docs/export-and-serving.md)"
QUANTIZED_FIX = f"serve an unquantized base or a compressed-tensors int8 W8A8 checkpoint, or {EXPORT_FIX}"
# Why a quantization is not served (docs/export-and-serving.md#quantized-bases), by vLLM's config class.
FP8_ON_CPU = (
    "vLLM's CPU build runs fp8 only on CPUs with AMX (elsewhere its fp8 input quantization is missing, and vLLM "
    "alone stops at `_C::static_scaled_fp8_quant() expected at most 0 argument(s)`)"
)
INT4_ON_CPU = (
    "vLLM's CPU build runs 4-bit AWQ and GPTQ weights only with its AVX512 kernels (`cpu_gemm_wna16`, missing from "
    "its AVX2 kernels, which the plugin is tested on)"
)
UNTESTED_QUANTIZATION = {
    Fp8Config: f"not tested with the routed adapter: {FP8_ON_CPU}",
    OnlineQuantizationConfig: f"online quantization is not tested with the routed adapter (fp8: {FP8_ON_CPU})",
    AutoAWQConfig: f"not tested with the routed adapter: {INT4_ON_CPU}",
    AutoGPTQConfig: f"not tested with the routed adapter: {INT4_ON_CPU}",
}


def adapter_dir(source: str) -> Path:
    """A local adapter directory as it is, or a model-hub id's snapshot (from the hub cache when offline)."""
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=[CONFIG, WEIGHTS]))
    except Exception as error:  # noqa: BLE001  (not a directory, not on the hub, not in the cache offline)
        raise refusal(
            ADAPTER_KEY,
            source,
            f"is neither a directory nor a model-hub id that could be fetched ({error})",
            "give the directory of a saved R-LoRA adapter or its hub id",
        ) from error


class RoutedPart(nn.Module):
    """One PEFT target inside a vLLM layer: this rank's slice of its adapter weights, in the model's dtype, and
    the rows `[start, stop)` of the layer's output it adds to; `reduce` sums the down-projection over the ranks
    where the layer's input is split. The frozen offset path `offset_A`, `offset_B` is among the weights only where
    the base weight could not absorb it (a quantized layer): then it runs as `r` more columns of the update."""

    def __init__(self, weights: dict[str, torch.Tensor], config: RLoraConfig, start: int, stop: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("lora_a", weights["A"], persistent=False)
        self.register_buffer("lora_b", weights["B"], persistent=False)
        self.register_buffer("router", weights.get("router"), persistent=False)  # none for one head
        self.register_buffer("offset_a", weights.get("offset_A"), persistent=False)  # none where folded
        self.register_buffer("offset_b", weights.get("offset_B"), persistent=False)
        self.start, self.stop = start, stop
        self.update = partial(
            routed_update, scaling=adapter_scaling(config),
            temperature=config.router_temperature, route=self.gates, reduce=reduce,
        )  # fmt: skip
        self.top_k = config.router_top_k

    def gates(self, probs: torch.Tensor) -> torch.Tensor:
        return top_k_gates(probs, self.top_k)[0]

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> None:
        offset = None if self.offset_a is None else (self.offset_a, self.offset_b)
        output[..., self.start : self.stop] += self.update(x, self.lora_a, self.lora_b, self.router, offset=offset)


def add_routed_update(layer: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Forward hook of an adapted vLLM linear layer (which returns `(output, bias)` or `output`)."""
    result = output[0] if isinstance(output, tuple) else output
    for part in layer.rlora_parts:
        part.add_to(result, args[0])
    return output


class RoutedAdapter:
    """Mixin of the routed architectures: refuses what it cannot serve exactly before any weight is loaded, and
    attaches the adapter once the base weights are."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # noqa: ANN001
        hf_config = vllm_config.model_config.hf_config
        source = getattr(hf_config, ADAPTER_KEY, None)
        if not isinstance(source, str) or not source:
            raise refusal(
                ADAPTER_KEY,
                source,
                f"is not one adapter: the `{ARCHITECTURE}` architecture needs one, `{ADAPTER_KEY}` in --hf-overrides",
                f'--hf-overrides \'{{"architectures": ["{ARCHITECTURE}"], "{ADAPTER_KEY}": "ADAPTER_DIR_OR_HUB_ID"}}\' '
                "(one R-LoRA adapter per server)",
            )
        size = vllm_config.parallel_config.pipeline_parallel_size
        if size > 1:
            raise refusal(
                "pipeline_parallel_size",
                size,
                "is not supported yet",
                "serve on one pipeline stage (tensor_parallel_size splits the model over devices)",
            )
        quantization = vllm_config.quant_config
        if quantization is not None and not isinstance(quantization, CompressedTensorsConfig):
            why = next((why for kind, why in UNTESTED_QUANTIZATION.items() if isinstance(quantization, kind)),
                       "not tested with the routed adapter")  # fmt: skip
            raise refusal(
                "quantization",
                vllm_config.model_config.quantization,
                f"is not served: {why}",
                QUANTIZED_FIX,
            )
        if quantization is not None and vllm_config.parallel_config.tensor_parallel_size > 1:
            raise refusal(
                "tensor_parallel_size",
                vllm_config.parallel_config.tensor_parallel_size,
                "is not tested with the routed adapter on a quantized base",
                f"serve it with tensor_parallel_size 1, or {EXPORT_FIX}",
            )
        if vllm_config.lora_config is not None:
            raise refusal(
                "enable_lora",
                True,
                "cannot be combined with the routed adapter (vLLM's LoRA layers would replace the hooked ones)",
                "drop --enable-lora; serve other LoRAs from another server",
            )
        load_format = vllm_config.load_config.load_format
        if not isinstance(get_model_loader(vllm_config.load_config), DefaultModelLoader):
            raise refusal(
                "load_format",
                load_format,
                "does not load weights through the model (where the adapter is attached)",
                "use load_format auto (or safetensors, pt)",
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.rlora_source, self.rlora_attached, self.rlora_hf_config = source, False, hf_config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.rlora_attached:
            raise refusal(
                "load_weights",
                "called again",
                "is not supported: reloading weights into a model with a routed adapter would lose its offset, "
                "folded into the base weights at load",
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
                "modules_to_save",
                sorted(others)[:3],
                "are full tensors the adapter saves besides its R-LoRA layers, which the plugin does not serve",
                "train without modules_to_save, or serve the adapter with PEFT",
            )
        scaling = adapter_scaling(config)
        for key, weights in modules.items():
            vllm_name, shard = targets[key]
            layer = layers[vllm_name]
            quantized = self.quantized(layer, key)
            start, stop = self.output_rows(layer, shard, quantized)
            expected = (config.r, layer.input_size), (self.output_size(layer, shard), config.num_heads * config.r)
            if (tuple(weights["A"].shape), tuple(weights["B"].shape)) != expected:
                raise refusal(
                    key,
                    f"A {tuple(weights['A'].shape)}, B {tuple(weights['B'].shape)}",
                    f"does not fit this base: its layer needs {expected[0]}, {expected[1]}",
                    "serve the adapter on the base model it was trained on",
                )
            ours = self.rank_slices(layer, shard, weights, start, stop)
            if "offset_A" in ours and not quantized:  # fold -s * Bbar0 A0 into this rank's rows of the base, in fp32
                base = layer.weight.data[start:stop]
                base.copy_(fold_offsets(base, [(scaling, ours.pop("offset_A"), ours.pop("offset_B"))]))
            if not hasattr(layer, "rlora_parts"):
                layer.rlora_parts = nn.ModuleList()
                layer.register_forward_hook(add_routed_update)
            split_input = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
            reduce = tensor_model_parallel_all_reduce if split_input else None
            if quantized:  # the dtype of the layer's input and output; its weight is integers
                dtype = private_attribute(layer, "params_dtype", torch.dtype, CHECKED)
                device = next(layer.parameters()).device
            else:
                dtype, device = layer.weight.dtype, layer.weight.device
            ours = {name: tensor.to(device, dtype) for name, tensor in ours.items()}
            layer.rlora_parts.append(RoutedPart(ours, config, start, stop, reduce))
        self.rlora_attached = True

    @staticmethod
    def rank_slices(layer: LinearBase, shard: str | int | None, weights: dict[str, torch.Tensor], start: int,
                    stop: int) -> dict[str, torch.Tensor]:  # fmt: skip
        """This rank's slice of each adapter tensor, cut by the layer's own weight loader as vLLM cuts the base
        weight: the output rows of `B` and `Bbar0` on a column-parallel layer, the input columns of `A`, the router
        and `A0` on a row-parallel one; the tensors as they are on a replicated layer or one device."""
        if isinstance(layer, ColumnParallelLinear):
            split, dim = ("B", "offset_B"), 0
        elif isinstance(layer, RowParallelLinear):
            split, dim = ("A", "router", "offset_A"), 1
        else:
            return dict(weights)
        ours = {}
        for name, tensor in weights.items():
            if name not in split:
                ours[name] = tensor
                continue
            shape = list(tensor.shape)
            shape[dim] = (  # this rank's rows or columns of the whole layer
                sum(private_attribute(layer, "output_partition_sizes", list, CHECKED)) if dim == 0
                else private_attribute(layer, "input_size_per_partition", int, CHECKED)
            )  # fmt: skip
            sliced = tensor.new_zeros(shape)
            setattr(sliced, "output_dim" if dim == 0 else "input_dim", dim)
            layer.weight_loader(sliced, tensor, *([] if shard is None else [shard]))
            ours[name] = sliced[start:stop].clone() if dim == 0 else sliced  # not the other parts' rows
        return ours

    @staticmethod
    def quantized(layer: LinearBase, target: str) -> bool:
        """Whether `layer`'s weight is quantized (by a scheme the plugin serves: compressed-tensors' int8 W8A8),
        so that the offset path cannot be folded into it; refused for the other schemes."""
        method = private_attribute(layer, "quant_method", QuantizeMethodBase, CHECKED)
        if isinstance(method, UnquantizedLinearMethod):
            return False
        scheme = None
        if isinstance(method, CompressedTensorsLinearMethod):
            scheme = private_attribute(layer, "scheme", CompressedTensorsScheme, CHECKED)
        if not isinstance(scheme, CompressedTensorsW8A8Int8):
            raise refusal(
                target,
                type(scheme or method).__name__,
                "is a quantization of this adapted layer not tested with the routed adapter (tested: "
                "compressed-tensors' int8 W8A8, `CompressedTensorsW8A8Int8`)",
                QUANTIZED_FIX,
            )
        return True

    @staticmethod
    def output_rows(layer: LinearBase, shard: str | int | None, quantized: bool = False) -> tuple[int, int]:
        """The rows `[start, stop)` of this rank's output of `layer` that a target fills: its part of a fused
        layer (`shard`), or all of them; checked against the layer's weight (a `quantized` layer's size: its
        weight may be packed)."""
        sizes = private_attribute(layer, "output_partition_sizes", list, CHECKED)
        private_attribute(layer, "input_size", int, CHECKED)
        if quantized:
            what, rows = "output_size", private_attribute(layer, "output_size", int, CHECKED)  # one rank only
        else:
            what, rows = "weight's rows", private_attribute(layer, "weight", torch.Tensor, CHECKED).shape[0]
        if sum(sizes) != rows:
            raise HostChanged(
                CHECKED, f"`{type(layer).__name__}.output_partition_sizes` {sizes} to add up to its {what} ({rows})",
            )  # fmt: skip
        if shard is None:
            return 0, rows
        part = "qkv".index(shard) if isinstance(shard, str) else shard
        return sum(sizes[:part]), sum(sizes[: part + 1])

    @staticmethod
    def output_size(layer: LinearBase, shard: str | int | None) -> int:
        """The rows of the whole layer's output (all ranks) that a target fills, as PEFT's target saves them."""

        def read(name: str, kind: type = int):  # noqa: ANN202
            return private_attribute(layer, name, kind, CHECKED)

        if isinstance(layer, QKVParallelLinear):  # K and V once each, not once per replicating rank
            q, kv = read("total_num_heads") * read("head_size"), read("total_num_kv_heads") * read("head_size")
            heads = (q, kv, read("total_num_kv_heads") * read("v_head_size"))
            return sum(heads) if shard is None else heads["qkv".index(shard)]
        if isinstance(layer, MergedColumnParallelLinear) and shard is not None:
            return read("output_sizes", list)[shard]
        return read("output_size")

    def vllm_target(self, name: str, layers: dict[str, nn.Module]) -> tuple[str, str | int | None]:
        """PEFT's module name -> vLLM's module and the target's shard of it: its index in the fused layer (`q`,
        `k`, `v` for attention), or None for a whole layer (also Phi-3's fused `qkv_proj`, saved fused)."""
        parent, _, leaf = name.rpartition(".")
        packed_modules = private_attribute(self, "packed_modules_mapping", dict, CHECKED)
        vllm_name, shard = name, None
        for packed, leaves in packed_modules.items():
            if leaf in leaves and leaves != [packed]:
                vllm_name, shard = f"{parent}.{packed}", leaves.index(leaf)
                break
        layer = layers.get(vllm_name)
        if ".experts." in f".{name}.":
            raise refusal(
                "target_modules",
                name,
                "is an expert of a mixture-of-experts layer, which vLLM runs inside one fused kernel for all experts "
                "(no per-token hook on one expert)",
                f"serve an adapter of the attention projections (q/k/v/o) of this model, or {EXPORT_FIX}",
            )
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear)):
            raise refusal(
                "target_modules",
                name,
                "is not a linear layer of this vLLM model",
                f"serve an adapter of the attention and MLP projections (q/k/v/o, gate/up/down), or {EXPORT_FIX}",
            )
        if isinstance(layer, QKVParallelLinear) and shard is not None:
            shard = "qkv"[shard]
        split = private_attribute(layer, "tp_size", int, CHECKED) > 1
        if split and (getattr(layer, "gather_output", False) or not getattr(layer, "input_is_parallel", True)
                      or not getattr(layer, "reduce_results", True)):  # fmt: skip
            raise refusal(
                "target_modules",
                name,
                "is a vLLM layer that gathers its output or its input, or leaves its output unreduced, under tensor "
                "parallelism",
                f"serve it with tensor_parallel_size 1, or {EXPORT_FIX}",
            )
        return vllm_name, shard


@cache
def routed_class(base: type[nn.Module]) -> type[nn.Module]:
    """The routed subclass of a vLLM model class (one per class, made once)."""
    return type(f"RLora{base.__name__}", (RoutedAdapter, base), {"__module__": __name__})


def base_class(vllm_config) -> type[nn.Module]:  # noqa: ANN001
    """The vLLM class that serves the base as a text model: transformers' causal-LM class for its `model_type`,
    as vLLM's registry resolves it; refused where that is not a plain text-generation model."""
    model_config = vllm_config.model_config
    model_type = model_config.hf_config.model_type
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if architecture not in ModelRegistry.get_supported_archs():
        raise refusal(
            "model_type",
            model_type,
            f"has no causal-LM architecture in vLLM's registry ({architecture or 'none in transformers'})",
            EXPORT_FIX,
        )
    base, _ = ModelRegistry.resolve_model_cls([architecture], model_config)
    if not is_text_generation_model(base) or any(
        check(base) for check in (supports_multimodal, is_hybrid, is_attention_free, has_inner_state)
    ):
        raise refusal(
            "model_type",
            model_type,
            f"is served by vLLM with `{architecture}`, which is not a text-only attention model (multimodal, hybrid "
            "or state-space); the routed adapter serves text models",
            EXPORT_FIX,
        )
    return base


class RLoraForCausalLM(LlamaForCausalLM):
    """The architecture named in --hf-overrides, for every family: builds `routed_class` of the base's own vLLM
    class. vLLM reads the model's interfaces (text generation, pipeline parallelism, ...) from this class before
    it is built: they are Llama's, which `base_class` checks the base shares."""

    def __new__(cls, *, vllm_config, prefix: str = "") -> nn.Module:  # noqa: ANN001
        return routed_class(base_class(vllm_config))(vllm_config=vllm_config, prefix=prefix)
