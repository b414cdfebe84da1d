"""What the heads learn: router statistics, head similarities and the load-balancing loss.

Pure functions on tensors, plus two small stateful helpers that switch on recording in every
`RLoraLayer` of a model:

- `MetricsCollector`: while it is enabled, every adapted layer adds its training-mode gates to running
  sums (detached; a few element-wise ops on a `(tokens, N)` tensor, no device sync), padding left out
  (`TokenMask`). `compute()` turns the sums into metrics, adds the head similarities (computed from the
  weights, only when asked) and resets the sums.
- `RouterAuxLoss`: between `start()` and `stop()`, every adapted layer records its load-balancing loss
  over the batch's real tokens (with gradient); `stop()` returns their mean over layers. `RLoraModel.forward`
  uses it to add the loss of `router_aux_loss_coef` to the model's own.

Metric keys (all floats, averaged over adapted layers unless the key says otherwise):
    rlora/router_entropy            mean over tokens of H(g(x)) / log N, in [0, 1] (1: uniform gates)
    rlora/router_entropy/<kind>     the same for one module kind (e.g. q_proj), averaged over depth
    rlora/head_load_max             largest mean gate of a head (1/N when balanced)
    rlora/head_load_ratio           max / min mean gate per head (1 when balanced)
    rlora/head_load_ratio_worst     the largest such ratio over layers
    rlora/head_cos_B                mean pairwise cosine similarity between the heads' B_i
    rlora/head_cos_BA               the same between the effective updates B_i A
    rlora/head_cos_BA/<kind>        the same for one module kind
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from .layer import RLoraLayer

PREFIX = "rlora/"
_EPS = 1e-12
_RATIO_CAP = 1e6  # a head that never gets a gate (top-k) would make the ratio infinite


# ---------------------------------------------------------------------------- pure functions
def split_heads(lora_b: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`B_cat (d_out, N*r)` -> `(N, d_out, r)`: head i is columns `i*r:(i+1)*r`."""
    d_out = lora_b.shape[0]
    return lora_b.reshape(d_out, num_heads, -1).permute(1, 0, 2)


def _cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    return gram / (norms[:, None] * norms[None, :]).clamp_min(_EPS)


def head_cosine_B(lora_b: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`(N, N)` cosine similarities between the flattened heads B_i."""
    heads = split_heads(lora_b.detach().float(), num_heads).flatten(1)
    return _cosine_from_gram(heads @ heads.T)


def head_cosine_BA(lora_a: torch.Tensor, lora_b: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`(N, N)` cosine similarities between the effective updates B_i A, without forming any
    `d_out x d_in` matrix: <B_i A, B_j A>_F = tr(A^T B_i^T B_j A) = tr((B_i^T B_j)(A A^T)).
    Cost O(N^2 d_out r + r^2 d_in)."""
    a = lora_a.detach().float()
    heads = split_heads(lora_b.detach().float(), num_heads)  # (N, d_out, r)
    gram_a = a @ a.T  # (r, r)
    mixed = heads @ gram_a  # B_j (A A^T), (N, d_out, r)
    gram = heads.flatten(1) @ mixed.flatten(1).T  # sum_{o,k} B_i[o,k] (B_j A A^T)[o,k] = tr(B_i^T B_j A A^T)
    return _cosine_from_gram(gram)


def low_rank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """`||B A||_F` without forming `B A`: `sqrt(tr((B^T B)(A A^T)))`."""
    b, a = b.detach().float(), a.detach().float()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a square matrix (the mean pairwise similarity); 1.0 if N = 1."""
    n = matrix.shape[0]
    if n < 2:
        return 1.0
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1)))


def normalized_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Per-token entropy of the gates `(..., N)` divided by log N, in [0, 1] (0 for N = 1)."""
    n = gates.shape[-1]
    if n < 2:
        return torch.zeros(gates.shape[:-1], device=gates.device)
    g = gates.float()
    return -(g * g.clamp_min(_EPS).log()).sum(-1) / math.log(n)


def load_ratio(load: torch.Tensor) -> float:
    """max / min of the mean gate per head (1 when balanced), capped at 1e6."""
    return float(min(load.max() / load.min().clamp_min(_EPS), _RATIO_CAP))


def real_tokens(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`(B, T)`: 1.0 for each real token and 0.0 for padding, from the `attention_mask` a model is called with (0 =
    padding; packed sequence ids are nonzero); None for no mask or one that is not `(B, T)` (a 4-D mask)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    return (attention_mask != 0).float()  # float once per forward: the layers' fp32 statistics need no conversion


def token_weights(token_mask: torch.Tensor | None, gates: torch.Tensor) -> torch.Tensor:
    """`(tokens,)`: 1 for each real token of `gates (..., N)` (flattened) and 0 for padding. `token_mask (B, T)`
    (bool or 1.0/0.0) applies to a layer whose tokens are the batch's positions, `gates (B, T, N)`; a layer that
    sees other tokens (a decoding step, or tokens gathered in another order) counts all of them as real.
    Weights, not indexing: no device sync."""
    tokens = gates.shape[:-1].numel()
    if token_mask is None or token_mask.shape != gates.shape[:-1]:
        return gates.new_ones(tokens, dtype=torch.float32)
    return token_mask.reshape(tokens).to(gates.device, torch.float32)


def load_balancing_loss(
    probs: torch.Tensor, chosen: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss `N * sum_i f_i P_i` for the router softmax `probs (..., N)`.

    `f_i` is the fraction of tokens routed to head i (its top-1 choice, or with `chosen (..., k)` its
    top-k choices, each counting 1/k), `P_i` the mean gate probability of head i. `f` carries no gradient,
    so the gradient pushes `P` toward balance. The minimum, 1, is reached by balanced routing. With
    `token_mask (B, T)` (see `token_weights`), padding tokens are left out, as in transformers' Mixtral.
    """
    n = probs.shape[-1]
    flat = probs.reshape(-1, n).float()
    if chosen is None:
        chosen = flat.argmax(-1, keepdim=True)
    chosen = chosen.reshape(flat.shape[0], -1)
    weight = token_weights(token_mask, probs)
    tokens = weight.sum().clamp_min(1)  # a batch of padding only gives 0
    counts = torch.zeros_like(flat).scatter_add_(-1, chosen, weight[:, None].expand(chosen.shape))
    fraction = counts.sum(0) / (tokens * chosen.shape[-1])
    mean_probs = (flat * weight[:, None]).sum(0) / tokens
    return n * (fraction.detach() * mean_probs).sum()


# ---------------------------------------------------------------------------- recording in the layers
class GateStats:
    """Running sums of one layer's gates over real tokens: per-head gate sums, normalized-entropy sum and
    token count (tensors, read only when metrics are computed)."""

    __slots__ = ("gate_sum", "entropy_sum", "tokens")

    def __init__(self) -> None:
        self.gate_sum: torch.Tensor | None = None
        self.entropy_sum: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, gates: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        flat = gates.reshape(-1, gates.shape[-1]).float()
        weight = token_weights(token_mask, gates)
        gate_sum, entropy_sum = (flat * weight[:, None]).sum(0), (normalized_entropy(flat) * weight).sum()
        if self.gate_sum is None:
            self.gate_sum, self.entropy_sum, self.tokens = gate_sum, entropy_sum, weight.sum()
        else:
            self.gate_sum += gate_sum
            self.entropy_sum += entropy_sum
            self.tokens += weight.sum()


class TokenMask:
    """Which tokens of the batch are real (`real_tokens`), from the `attention_mask` keyword the model is called with
    (as the HF Trainer and `generate` call it), so gate statistics and recorded gates leave padding out.

    A forward pre-hook on the model. `current` (`(B, T)` or None) stays set until the next call, so a forward that
    gradient checkpointing recomputes during backward sees its own batch's mask.
    """

    def __init__(self, model: nn.Module) -> None:
        self.current: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self._set, with_kwargs=True)

    def _set(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.current = real_tokens(kwargs.get("attention_mask"))

    def remove(self) -> None:
        self.handle.remove()
        self.current = None


class GateObservers:
    """One callable attached to every R-LoRA layer's `gate_observers`, with the batch's token mask; `detach()`
    takes both off again."""

    def __init__(self, model: nn.Module, observe) -> None:  # noqa: ANN001
        self.token_mask = TokenMask(model)
        self.layers = [layer for _, layer in rlora_layers(model)]
        self._observe = observe
        for layer in self.layers:
            layer.gate_observers.append(self._call)

    def _call(self, layer: nn.Module, probs: torch.Tensor, gates: torch.Tensor, chosen: torch.Tensor | None) -> None:
        self._observe(layer, probs, gates, chosen, self.token_mask.current)

    def detach(self) -> None:
        for layer in self.layers:
            layer.gate_observers.remove(self._call)
        self.token_mask.remove()


def module_kind(name: str) -> str:
    """The last non-numeric part of a module name: `...layers.3.mlp.down_proj` -> `down_proj`."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return parts[-1] if parts else name


def rlora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RLoraLayer)]


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded DTensor (an all-gather: every rank must call it, in the same order);
    ops on the DTensor itself would leave partial sums on each rank."""
    return weight.detach().full_tensor() if hasattr(weight, "full_tensor") else weight


def similarity_metrics(model: nn.Module, per_kind: bool = True) -> dict[str, float]:
    """`rlora/head_cos_B`, `rlora/head_cos_BA` (and per module kind) from the adapter weights."""
    cos_b, cos_ba, by_kind = [], [], defaultdict(list)
    for name, layer in rlora_layers(model):
        adapter = next(iter(layer.routed_adapters), None)
        if adapter is None or layer.num_heads[adapter] < 2:
            continue
        heads = layer.num_heads[adapter]
        lora_a, lora_b = _full(layer.rlora_A[adapter]), _full(layer.rlora_B[adapter])
        if lora_b.dim() != 2 or lora_b.numel() == 0:  # a ZeRO-3 / FSDP1 partition, not the full weight
            continue
        cos_b.append(mean_off_diagonal(head_cosine_B(lora_b, heads)))
        value = mean_off_diagonal(head_cosine_BA(lora_a, lora_b, heads))
        cos_ba.append(value)
        by_kind[module_kind(name)].append(value)
    if not cos_b:
        return {}
    out = {f"{PREFIX}head_cos_B": sum(cos_b) / len(cos_b), f"{PREFIX}head_cos_BA": sum(cos_ba) / len(cos_ba)}
    if per_kind and len(by_kind) > 1:
        out |= {f"{PREFIX}head_cos_BA/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return out


class MetricsCollector:
    """Records the training-mode gates of every R-LoRA layer of `model` while enabled, and turns them into
    metrics.

    Only training-mode forwards are recorded (not evaluation or generation). With gradient
    checkpointing a recomputed forward is recorded twice, which leaves the averages unchanged.
    """

    def __init__(self, model: nn.Module, per_kind: bool = True) -> None:
        self.layers = rlora_layers(model)
        self.model = model
        self.per_kind = per_kind
        self.stats: dict[nn.Module, GateStats] = {}
        self.observers: GateObservers | None = None

    def enable(self) -> MetricsCollector:
        self.stats = {layer: GateStats() for _, layer in self.layers}
        self.observers = self.observers or GateObservers(self.model, self._record)
        return self

    def _record(self, layer, probs, gates, chosen, token_mask) -> None:  # noqa: ANN001
        if layer.training:
            self.stats[layer].update(gates.detach(), token_mask)

    def disable(self) -> None:
        if self.observers is not None:
            self.observers.detach()
            self.observers = None
        self.stats = {}

    def gate_metrics(self, reset: bool = True) -> dict[str, float]:
        entropies, ratios, load_max, by_kind = [], [], [], defaultdict(list)
        for name, layer in self.layers:
            stats = self.stats.get(layer)
            tokens = float(stats.tokens) if stats is not None and stats.tokens is not None else 0.0
            if not tokens:
                continue
            load = stats.gate_sum / tokens
            entropy = float(stats.entropy_sum) / tokens
            entropies.append(entropy)
            by_kind[module_kind(name)].append(entropy)
            ratios.append(load_ratio(load))
            load_max.append(float(load.max()))
            if reset:
                self.stats[layer] = GateStats()
        if not entropies:
            return {}
        out = {
            f"{PREFIX}router_entropy": sum(entropies) / len(entropies),
            f"{PREFIX}head_load_max": sum(load_max) / len(load_max),
            f"{PREFIX}head_load_ratio": sum(ratios) / len(ratios),
            f"{PREFIX}head_load_ratio_worst": max(ratios),
        }
        if self.per_kind and len(by_kind) > 1:
            out |= {f"{PREFIX}router_entropy/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())}
        return out

    def compute(self, similarities: bool = True, reset: bool = True) -> dict[str, float]:
        """Gate metrics since the last call (empty before any training forward) and head similarities."""
        out = self.gate_metrics(reset=reset)
        if similarities:
            out |= similarity_metrics(self.model, self.per_kind)
        return out


class RouterAuxLoss:
    """Collects the layers' load-balancing losses of one forward pass (what `RLoraModel.forward` adds to the loss
    with `router_aux_loss_coef > 0`).

        aux = RouterAuxLoss(model)
        aux.start(attention_mask)   # the batch's mask (optional): padding is left out
        loss = model(**batch).loss
        loss = loss + coef * aux.stop()   # stop() returns None if nothing was recorded

    Only forwards in training mode with gradients enabled record a loss, and only between start() and stop(): a
    forward that non-reentrant gradient checkpointing recomputes during backward records nothing, and one that a
    reentrant checkpoint runs without gradients records nothing at all. From its creation the layers compute the
    loss in every training forward with gradients (so that a recomputed forward runs exactly the ops of the original
    one, with the mask of the last start()); close() switches that off.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [layer for _, layer in rlora_layers(model)]
        self.token_mask: torch.Tensor | None = None
        self.open: list[torch.Tensor] | None = None  # the losses of the current start()/stop() window
        self.total = 0.0  # detached running sum of the values returned by stop(), for logging
        self.count = 0
        for layer in self.layers:
            layer.gate_observers.append(self._record)

    def _record(self, layer, probs, gates, chosen) -> None:  # noqa: ANN001
        if layer.training and torch.is_grad_enabled():
            loss = load_balancing_loss(probs, chosen, self.token_mask)
            if self.open is not None:
                self.open.append(loss)

    def start(self, attention_mask: torch.Tensor | None = None) -> None:
        self.token_mask = real_tokens(attention_mask)
        self.open = []

    def stop(self) -> torch.Tensor | None:
        losses, self.open = self.open or [], None
        if not losses:
            return None
        loss = torch.stack([t.to(losses[0].device) for t in losses]).mean()
        self.total = self.total + loss.detach()
        self.count += 1
        return loss

    def close(self) -> None:
        for layer in self.layers:
            layer.gate_observers.remove(self._record)
        self.layers, self.open, self.token_mask = [], None, None

    def pop_mean(self) -> float | None:
        """Mean of the losses returned by stop() since the last call (None if none), and reset."""
        if not self.count:
            return None
        value = float(self.total) / self.count
        self.total, self.count = 0.0, 0
        return value
