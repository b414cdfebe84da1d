"""The R-LoRA layer. The method's math (docs/method.md) lives here and nowhere else."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .config import RLoraConfig
from .errors import ConfigError, InputError

MERGE_WHY = (
    "R-LoRA adapters cannot be merged into the base weights: each token mixes the heads B_i with its own "
    "router gates g(x) = softmax(W_g x), so the update sum_i g_i(x) B_i A x is not one fixed matrix"
)
MERGE_FIX = (
    "run the model with the adapter attached (PeftModel.from_pretrained after `import rlora_plugin`), "
    "or call unload() to get the unchanged base model back. To merge, first export the adapter with its "
    "gates frozen to constants as a plain LoRA: `python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates "
    "uniform` (or `--gates mean --data FILE`); that LoRA merges exactly"
)


def merge_refusal() -> ConfigError:
    """The one refusal of every merge (and unmerge) of PEFT's that reaches R-LoRA, its model's or a layer's."""
    return ConfigError("RLoraModel", "merge", True, f"is refused: {MERGE_WHY}", MERGE_FIX)


MERGE_REFUSAL = str(merge_refusal())  # its message


def adapter_scaling(config: RLoraConfig) -> float:
    """`s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def frozen_gate_lora(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gates: torch.Tensor,
    scaling: float,
    offset_a: torch.Tensor | None = None,
    offset_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With the gates frozen to constants `c (N,)` (eval mode), a layer's update
    `s * sum_i c_i B_i A x - s * Bbar0 A0 x` is the plain LoRA `B' A' x` (scaling 1) with
    `A' = [A ; A0]` and `B' = [s * sum_i c_i B_i , -s * Bbar0]`; rank r without an offset path
    (docs/method.md#frozen-gates-the-export-to-a-plain-lora)."""
    heads = gates.numel()
    mixed = scaling * (lora_b.view(lora_b.shape[0], heads, -1) * gates.view(1, heads, 1)).sum(dim=1)
    if offset_a is None:
        return lora_a, mixed
    return torch.cat([lora_a, offset_a]), torch.cat([mixed, -scaling * offset_b], dim=1)


def fold_offsets(weight: torch.Tensor, offsets: list[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`W0 - sum s * Bbar0 A0` over `offsets` of `(s, A0, Bbar0)`, computed in fp32 and rounded once to the weight's
    dtype: a base weight with frozen offset paths folded in, for the PEFT layer's forwards without gradients and
    the vLLM plugin."""
    delta = sum(s * offset_b.float() @ offset_a.float() for s, offset_a, offset_b in offsets)
    return (weight.float() - delta.to(weight.device)).to(weight.dtype)


def top_k_gates(probs: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The router's top-k: the `top_k` largest of `probs (..., N)` renormalized to sum to 1, the others 0, and the
    indices kept; `probs` themselves and None (dense routing) when `top_k` is None, 0 or at least N."""
    if not top_k or top_k >= probs.shape[-1]:
        return probs, None
    kept, chosen = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, chosen, kept / kept.sum(-1, keepdim=True)), chosen


# From this many tokens on, `routed_update` copies its small weights into one down- and one up-projection: reading
# the tokens once costs more than the copy (training, prefill). Below it (decode), each weight gets its own
# product and nothing is copied. Measured in benchmarks/README.md ("One product or several").
STACK_FROM_TOKENS = 128


def routed_update(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor | None = None,
    *,
    scaling: float,
    temperature: float = 1.0,
    offset: tuple[torch.Tensor, torch.Tensor] | None = None,
    route: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
    per_head_dropout: bool = False,
    add_to: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`s * sum_i g_i(x) B_i drop_i(A x) - offset(x)` with no loop over heads (docs/method.md): the one source of
    the routed update, for the PEFT layer and the vLLM plugin.

    `lora_a` is `A (r, d_in)`, `lora_b` the heads side by side `[B_1 .. B_N] (d_out, N*r)`, `router` `W_g (N, d_in)`
    (None for one head, whose gate is 1), `offset` the frozen path `(A0 (r, d_in), Bbar0 (d_out, r))` or None. The
    router's softmax runs in fp32 (at `temperature`); `route` maps its probabilities to the gates (dense when
    None; `top_k_gates` keeps k). `dropout` (training only) masks the features once, or for each head with
    `per_head_dropout`. With `add_to` (the base layer's output), returns `add_to` plus the update. `reduce`
    (tensor parallelism, where `x` and the down-projections hold one rank's slice of the input features) sums the
    down-projection `[A ; W_g ; A0] x` over the ranks, in one call, before the softmax.
    """
    downs = [lora_a, *([router] if router is not None else []), *([offset[0]] if offset is not None else [])]
    stack = reduce is not None or x.numel() >= STACK_FROM_TOKENS * x.shape[-1]
    if stack:  # [h ; logits ; h0] = [A ; W_g ; A0] x in one product (one split: a slice's backward costs more)
        down = F.linear(x, torch.cat(downs))
        parts = (down if reduce is None else reduce(down)).split([w.shape[0] for w in downs], dim=-1)
    else:
        parts = [F.linear(x, w) for w in downs]
    features = parts[0]
    if router is None:  # one head: its gate is 1
        probs = features.new_ones(*features.shape[:-1], 1, dtype=torch.float32)
    else:
        logits = parts[1] if parts[1].dtype == torch.float32 else parts[1].float()
        probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    gates = probs if route is None else route(probs)
    if gates.dtype != features.dtype:
        gates = gates.to(features.dtype)

    if dropout is not None and not per_head_dropout:
        features = dropout(features)
    mixed = gates.unsqueeze(-1) * features.unsqueeze(-2)  # (..., N, r): g_i * h for every head
    if dropout is not None and per_head_dropout:
        mixed = dropout(mixed)  # an independent mask for each head
    mixed = mixed.flatten(-2)
    separate_offset = offset is not None and not stack
    if offset is not None and stack:  # [B_1 .. B_N, Bbar0] [g * h ; -h0]: the offset in the same product
        mixed, lora_b = torch.cat([mixed, parts[-1].neg()], dim=-1), torch.cat([lora_b, offset[1]], dim=-1)

    if add_to is not None and add_to.dtype == lora_b.dtype and (add_to.dim() == 2 or (stack and add_to.dim() > 2)):
        # addmm writes base + s * update in one pass, saving a (tokens, d_out) temporary and an add over it.
        flat = torch.addmm(add_to.flatten(0, -2), mixed.flatten(0, -2), lora_b.T, alpha=scaling)
        if separate_offset:
            flat = torch.addmm(flat, parts[-1].flatten(0, -2), offset[1].T, alpha=-scaling)
        return flat.view(add_to.shape)
    update = F.linear(mixed, lora_b)
    if separate_offset:
        update = update - F.linear(parts[-1], offset[1])
    if add_to is None:
        return update * scaling
    return torch.add(add_to, update if update.dtype == add_to.dtype else update.to(add_to.dtype), alpha=scaling)


def layer_seed(init_seed: int, layer_name: str) -> int:
    """A seed per layer from the config seed and the module name, identical on every rank and run."""
    digest = hashlib.sha256(f"{init_seed}:{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_weights(
    config: RLoraConfig, in_features: int, out_features: int, layer_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw `A (r, d_in)`, `B_cat (d_out, N*r)` and the router `W_g (N, d_in)` in fp32; no router for one
    head, whose single softmax gate is the constant 1 (a router there would get no gradient).

    Only the layer's sizes are read, never the base weight: under ZeRO-3 it is an empty partition.
    """
    gen = torch.Generator().manual_seed(layer_seed(config.init_seed, layer_name))
    r, heads = config.r, config.num_heads
    if config.init == "random":  # docs/method.md#initialization-and-the-offset-path (LoRA-GA's scaling)
        scale = out_features**0.25 / math.sqrt(config.init_gamma)
        lora_a = torch.randn(r, in_features, generator=gen) * (scale / math.sqrt(in_features))
        lora_b = torch.randn(out_features, heads * r, generator=gen) * (scale / math.sqrt(out_features))
    else:  # HydraLoRA / LoRA
        lora_a = nn.init.kaiming_uniform_(torch.empty(r, in_features), a=math.sqrt(5), generator=gen)
        lora_b = torch.zeros(out_features, heads * r)
        if not config.init_weights:  # PEFT's non-identity init (LoRA's init_lora_weights=False): B as nn.Linear
            nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5), generator=gen)
    if heads == 1:
        return lora_a, lora_b, None
    router = torch.zeros(heads, in_features)
    if config.router_init == "kaiming":
        nn.init.kaiming_uniform_(router, a=math.sqrt(5), generator=gen)
    return lora_a, lora_b, router


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """Sizes of an `nn.Linear` or of GPT-2's `Conv1D` (weight stored `(in, out)`; the full shape under ZeRO-3 is
    `ds_shape`). The update is computed from the input, never from the weight, so the layout matters only here."""
    if isinstance(base, Conv1D):
        d_in, d_out = getattr(base.weight, "ds_shape", base.weight.shape)
        return d_in, d_out
    return base.in_features, base.out_features


class RLoraLayer(BaseTunerLayer):
    """Per adapter: a shared down-projection `rlora_A (r, d_in)`, the heads side by side in
    `rlora_B (d_out, N*r)` (head i is columns `i*r:(i+1)*r`), the router `rlora_router (N, d_in)` (none
    for one head), and with `init="random"` (and `init_weights`) the frozen offset path
    `rlora_offset_A (r, d_in)`, `rlora_offset_B (d_out, r)` that subtracts the initial adapter output
    (saved with the adapter, so reloads stay exact).
    """

    adapter_layer_names = ("rlora_A", "rlora_B", "rlora_router")
    adapter_tensor_names = (*adapter_layer_names, "rlora_offset_A", "rlora_offset_B")  # what an adapter saves
    other_param_names = (
        "rlora_offset_A",
        "rlora_offset_B",
        "rlora_dropout",
        "r",
        "num_heads",
        "scaling",
        "router_temperature",
        "head_dropout",
        "router_top_k",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_heads: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.router_temperature: dict[str, float] = {}
        self.head_dropout: dict[str, str] = {}
        self.router_top_k: dict[str, int | None] = {}
        # Callables `observer(layer, probs, gates, chosen)` told of every routing decision (see `route`): the
        # metrics, the load-balancing loss (rlora_plugin.metrics) and gate recording (rlora_plugin.routing).
        self.gate_observers: list[Callable[..., None]] = []
        # Gates fixed to constants `(N,)` per adapter, instead of the router's (rlora_plugin.routing).
        self.fixed_gates: dict[str, torch.Tensor] = {}
        self.rlora_dropout = nn.ModuleDict({})
        self.rlora_A = nn.ParameterDict({})
        self.rlora_B = nn.ParameterDict({})
        self.rlora_router = nn.ParameterDict({})
        self.rlora_offset_A = BufferDict({}, persistent=True)
        self.rlora_offset_B = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # `(stamp, base weight, folded weight or None)`: the base weight with the offset paths folded in, for
        # forwards without gradients (see `RLoraLinear.folded_base_weight`).
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.in_features, self.out_features = in_out_features(base)
        # bitsandbytes' Linear4bit on an AVX512-BF16 CPU repacks its weight at the first no-grad eval forward
        # for a bf16 kernel that has no backward (later training steps drop the gradient through the layer)
        # and that a state_dict() unpacks with a lossy absmax round trip: keep the dequantize + matmul path
        # while this layer wraps it; unload() puts the user's setting back.
        self._bnb_cpu_packing = bool(getattr(base, "support_avx512bf16_for_cpu", False))
        if self._bnb_cpu_packing:
            base.support_avx512bf16_for_cpu = False

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Any) -> nn.Module:
        """PEFT's `unload()` takes the base layer from here: it gets its bitsandbytes setting back."""
        if merge:
            raise merge_refusal()
        base = self.get_base_layer()
        if self._bnb_cpu_packing:
            base.support_avx512bf16_for_cpu = True
        return base

    def update_layer(self, adapter_name: str, config: RLoraConfig, layer_name: str) -> None:
        r, heads = config.r, config.num_heads
        self.r[adapter_name] = r
        self.num_heads[adapter_name] = heads
        self.scaling[adapter_name] = adapter_scaling(config)
        self.router_temperature[adapter_name] = config.router_temperature
        self.head_dropout[adapter_name] = config.head_dropout
        self.router_top_k[adapter_name] = config.router_top_k
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.rlora_dropout[adapter_name] = dropout

        lora_a, lora_b, router = initial_weights(config, self.in_features, self.out_features, layer_name)
        self.rlora_A[adapter_name] = nn.Parameter(lora_a)
        self.rlora_B[adapter_name] = nn.Parameter(lora_b)
        if router is not None:
            self.rlora_router[adapter_name] = nn.Parameter(router)
        if config.init == "random" and config.init_weights:
            # offset(x) = s * mean_i(B_i^0) A^0 x equals the adapter output at step 0 for a uniform router.
            self.rlora_offset_A[adapter_name] = lora_a.clone()
            self.rlora_offset_B[adapter_name] = lora_b.view(self.out_features, heads, r).mean(dim=1)

        self._folded = None
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def routed_update(
        self, x: torch.Tensor, adapter: str, add_to: torch.Tensor | None = None, offset: bool = True
    ) -> torch.Tensor:
        """This layer's `routed_update` for `adapter`, with its dropout while training and its `route`; without
        the offset path when `offset` is False (it is folded into the base weight, see `folded_base_weight`)."""
        lora_a = self.rlora_A[adapter]
        if x.dtype != lora_a.dtype:
            x = self._cast_input_dtype(x, lora_a.dtype)
        dropout = self.rlora_dropout[adapter]
        steered = self.gate_observers or self.router_top_k[adapter] or adapter in self.fixed_gates
        offset = offset and adapter in self.rlora_offset_A
        return routed_update(
            x, lora_a, self.rlora_B[adapter], self.rlora_router[adapter] if self.num_heads[adapter] > 1 else None,
            scaling=self.scaling[adapter],
            temperature=self.router_temperature[adapter],
            offset=(self.rlora_offset_A[adapter], self.rlora_offset_B[adapter]) if offset else None,
            route=(lambda probs: self.route(probs, adapter)) if steered else None,
            dropout=dropout if dropout.training else None, per_head_dropout=self.head_dropout[adapter] == "per_head",
            add_to=add_to,
        )  # fmt: skip

    @property
    def routed_adapters(self) -> list[str]:
        """The active adapters that are R-LoRA adapters of this layer."""
        return [adapter for adapter in self.active_adapters if adapter in self.rlora_A]

    def route(self, probs: torch.Tensor, adapter: str) -> torch.Tensor:
        """The gates applied to the heads from the router's softmax `probs (..., N)` (fp32): dense, the top-k
        renormalized over the kept k, or constants fixed by `rlora_plugin.routing.fixed_gates`. Every
        `gate_observers` callable sees `probs`, the gates and the top-k choice (None when dense)."""
        if adapter in self.fixed_gates:
            gates, chosen = self.fixed_gates[adapter].to(probs).expand_as(probs), None
        else:
            gates, chosen = top_k_gates(probs, self.router_top_k.get(adapter))
        for observe in self.gate_observers:
            observe(self, probs, gates, chosen)
        return gates


class RLoraLinear(nn.Module, RLoraLayer):
    """An `nn.Linear` with R-LoRA adapters: `y = W0 x + b + routed_update(x)`."""

    # Fold the frozen offset path into a copy of the base weight in forwards without gradients (see
    # `folded_base_weight`): one more copy of each adapted weight in memory while generating, no offset matmuls
    # per token. Set to False (on the class or a layer) to keep the memory and the matmuls.
    fold_offset: bool = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RLoraConfig, layer_name: str) -> None:
        super().__init__()
        RLoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        adapters = self.routed_adapters
        folded = None
        if args or kwargs or torch.is_grad_enabled() or torch.compiler.is_compiling() or not self.fold_offset:
            self._folded = None
        else:
            folded = self.folded_base_weight(adapters)
        if folded is None:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = F.linear(x, folded, self.base_layer.bias)
        for adapter in adapters:
            result = self.routed_update(x, adapter, add_to=result, offset=folded is None)
        return result

    def folded_base_weight(self, adapters: list[str]) -> torch.Tensor | None:
        """The base weight minus the frozen offset paths of `adapters`, `W0 - sum s * Bbar0 A0`, which a forward
        without gradients (generation, evaluation) uses instead of the offset path: the offset is a constant
        matrix, so per token only the trainable adapter weights are read. The base weight itself is never written,
        so nothing is undone when training resumes, an adapter is disabled or switched, or the model is saved.

        None where the offset stays on the per-token path: no offset path among `adapters`, or a base that is not
        a plain `nn.Linear` with its weight in memory (quantized, Conv1D, ZeRO-3 or FSDP shards, offloaded, made
        under `torch.inference_mode`). The copy is made again when the adapters or the base weight change
        (`set_adapter`, `.to()`, an in-place write) or tensors are loaded (`load_state_dict`: the frozen offset
        tensors change no other way), and dropped at the first forward with gradients."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.is_inference():  # made under inference_mode: no version
            self._folded = None
            return None
        stamp = (adapters, weight.data_ptr(), weight._version)
        if self._folded is not None and self._folded[1] is weight and self._folded[0] == stamp:
            return self._folded[2]
        offsets = [adapter for adapter in adapters if adapter in self.rlora_offset_A]
        base = self.base_layer
        plain = type(base) is nn.Linear and type(weight.data) is torch.Tensor and not weight.is_meta
        if not offsets or not plain or hasattr(base, "_hf_hook") or hasattr(weight, "ds_id"):
            self._folded = stamp, weight, None
            return None
        with torch.no_grad():
            folded = fold_offsets(
                weight, [(self.scaling[a], self.rlora_offset_A[a], self.rlora_offset_B[a]) for a in offsets]
            )
        self._folded = stamp, weight, folded
        return folded

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        """`.to()`, `.half()` and the like replace the weights' storage (whose address the allocator may hand
        out again, with the version counter kept): the fold is made again from the converted weights."""
        self._folded = None
        return super()._apply(fn, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise merge_refusal()

    def unmerge(self) -> None:
        raise merge_refusal()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Refuse an adapter trained on a base model of other shapes, with a message instead of torch's."""
        for name in self.adapter_tensor_names:
            for adapter, tensor in getattr(self, name).items():
                saved = state_dict.get(f"{prefix}{name}.{adapter}")
                if saved is not None and saved.shape != tensor.shape:
                    raise InputError(
                        f"Cannot load R-LoRA adapter '{adapter}' into '{prefix.rstrip('.')}'",
                        name,
                        saved,
                        f"does not fit: this base model's layer (in_features={self.in_features}, out_features="
                        f"{self.out_features}) with r={self.r[adapter]}, num_heads={self.num_heads[adapter]} "
                        f"needs {tuple(tensor.shape)}",
                        "load the adapter onto the base model it was trained on",
                    )
        self._folded = None  # the offset path or the base weight may change
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "rlora." + super().__repr__()
