"""Inference-time routing controls: see what the heads do and steer them, without changing the saved config.

    with record_gates(model) as record:          # the gates of every forward inside, padding left out
        model.generate(**batch)
    record.gates["model.layers.0.mlp.up_proj"]   # (real tokens, N); record.mean(): each layer's mean gate

    with routing(model, top_k=1, temperature=0.5):   # sparser or sharper routing, for this block only
        model.generate(**batch)

    with fixed_gates(model, "uniform"):          # or N constants, or record.mean(): what the export freezes
        model.generate(**batch)                  # so an export's quality can be checked before exporting

Layer names are the base model's module names (`model.layers.0.mlp.up_proj`), as in the export.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ConfigError
from .metrics import GateObservers, rlora_layers, token_weights

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The R-LoRA layers of `model` (a PeftModel or its base) by the base model's module names."""
    layers = {name.removeprefix(PEFT_PREFIX): layer for name, layer in rlora_layers(model)}
    if not layers:
        raise ConfigError(
            "routing",
            "model",
            type(model).__name__,
            "has no R-LoRA layers",
            "load an R-LoRA adapter first (PeftModel.from_pretrained after `import rlora_plugin`)",
        )
    return layers


class GateRecord:
    """The gates each layer applied, one `(tokens, N)` tensor per forward, real tokens only."""

    def __init__(self, names: dict[nn.Module, str]) -> None:
        self._names = names
        self._parts: dict[str, list[torch.Tensor]] = {name: [] for name in names.values()}

    def add(self, layer, probs, gates, chosen, token_mask) -> None:  # noqa: ANN001
        flat = gates.detach().reshape(-1, gates.shape[-1]).float()
        if token_mask is not None:  # a decoding step's tokens are all real (see token_weights)
            flat = flat[token_weights(token_mask, gates).to(flat.device).bool()]
        self._parts[self._names[layer]].append(flat.cpu())

    @property
    def gates(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts) for name, parts in self._parts.items() if parts}

    def mean(self) -> dict[str, torch.Tensor]:
        """Each layer's mean gate over every recorded real token: the per-layer constants of a frozen export."""
        return {name: gates.mean(dim=0) for name, gates in self.gates.items()}


@contextmanager
def record_gates(model: nn.Module) -> Iterator[GateRecord]:
    """Record the gates of every forward of `model` inside the block, per layer and real token (the
    `attention_mask` the model is called with marks padding, as `generate` and the HF Trainer pass it)."""
    record = GateRecord({layer: name for name, layer in _layers(model).items()})
    observers = GateObservers(model, record.add)
    try:
        yield record
    finally:
        observers.detach()


@contextmanager
def routing(model: nn.Module, top_k: int | None = None, temperature: float | None = None) -> Iterator[None]:
    """Override `router_top_k` (0: dense) and `router_temperature` of the active adapters inside the block;
    the saved config and the values outside the block are unchanged."""
    layers = _layers(model)
    saved = [(layer, adapter, layer.router_top_k[adapter], layer.router_temperature[adapter])
             for layer in layers.values() for adapter in layer.routed_adapters]  # fmt: skip
    for layer, adapter, _, _ in saved:
        heads = layer.num_heads[adapter]
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= heads:
                raise ConfigError(
                    "routing", "top_k", top_k, "is invalid", f"use an integer in [1, {heads}], or 0 for dense"
                )
            layer.router_top_k[adapter] = top_k or None
        if temperature is not None:
            if isinstance(temperature, bool) or not (math.isfinite(temperature) and temperature > 0):
                raise ConfigError("routing", "temperature", temperature, "is invalid", "use a finite number > 0")
            layer.router_temperature[adapter] = float(temperature)
    try:
        yield
    finally:
        for layer, adapter, old_top_k, old_temperature in saved:
            layer.router_top_k[adapter], layer.router_temperature[adapter] = old_top_k, old_temperature


def parse_gates(gates: str | Sequence[float] | torch.Tensor, num_heads: int) -> torch.Tensor:
    """Constant gates: 'uniform', or N numbers >= 0 that sum to 1 (a softmax's range), as a list, a tensor or
    the text `0.1,0.3,...`."""
    if isinstance(gates, str) and gates == "uniform":
        return torch.full((num_heads,), 1.0 / num_heads)
    fix = f"give 'uniform' or {num_heads} comma-separated numbers >= 0 that sum to 1, e.g. --gates uniform"
    try:
        values = [float(v) for v in gates.split(",")] if isinstance(gates, str) else torch.as_tensor(gates).tolist()
    except (TypeError, ValueError):
        values = None
    if not isinstance(values, list) or len(values) != num_heads:
        raise ConfigError("routing", "gates", gates, f"are invalid for an adapter with {num_heads} heads", fix)
    tensor = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(tensor).all() or (tensor < 0).any() or abs(float(tensor.sum()) - 1.0) > 1e-4:
        raise ConfigError("routing", "gates", gates, "are invalid: they must be >= 0 and sum to 1", fix)
    return tensor


@contextmanager
def fixed_gates(
    model: nn.Module, gates: str | Sequence[float] | torch.Tensor | dict[str, torch.Tensor]
) -> Iterator[None]:
    """Run the active adapters with their gates fixed to constants inside the block: 'uniform', N constants
    for every layer, or one `(N,)` tensor per layer name (e.g. `GateRecord.mean()`). This is the model the
    frozen-gate export writes as a plain LoRA."""
    layers = _layers(model)
    if isinstance(gates, dict):
        missing = sorted(set(layers) - set(gates))
        if missing:
            raise ConfigError(
                "routing",
                f"gates[{missing[0]!r}]",
                None,
                f"is missing: no gates for {len(missing)} of the model's {len(layers)} R-LoRA layers "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})",
                "give one (N,) tensor for each R-LoRA layer, by its base model name (e.g. `GateRecord.mean()` "
                "of `record_gates` on this model)",
            )
    chosen = {
        name: parse_gates(gates[name] if isinstance(gates, dict) else gates, layer.num_heads[adapter])
        for name, layer in layers.items()
        for adapter in layer.routed_adapters
    }
    for name, layer in layers.items():
        for adapter in layer.routed_adapters:
            layer.fixed_gates[adapter] = chosen[name]
    try:
        yield
    finally:
        for layer in layers.values():
            for adapter in layer.routed_adapters:
                layer.fixed_gates.pop(adapter, None)
