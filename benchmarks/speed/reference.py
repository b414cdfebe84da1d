"""The per-head loop reference, written the way the authors' (HydraLoRA-derived) code computes it."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .counts import ALPHA, DROPOUT


class LoopLinear(nn.Module):
    """``y = W0 x + sum_i g_i(x) * s * B_i(A(dropout(x)))`` with ``A(dropout(x))`` recomputed per head.

    As in the authors' code: the dropout is on the layer input ``x`` with a fresh mask per head, ``A`` and
    every ``B_i`` are ``nn.Linear`` modules, the router sees the raw ``x`` and its softmax is taken in fp32.
    (Their init edits ``W0``; there is no offset path, so this does slightly less work than rlora.)
    """

    def __init__(self, base: nn.Linear, r: int, heads: int, dropout: float, alpha: float) -> None:
        super().__init__()
        self.base_layer = base
        d_in, d_out = base.in_features, base.out_features
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(heads))
        for b in self.lora_B:
            nn.init.normal_(b.weight, std=1 / math.sqrt(d_out))
        self.lora_route = nn.Linear(d_in, heads, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        route_weight = F.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i, lora_b in enumerate(self.lora_B):
            result = result + route_weight[..., i : i + 1] * lora_b(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result


def attach_loop(model: nn.Module, targets: list[str], r: int, heads: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoopLinear(child, r, heads, DROPOUT, ALPHA))
        del name
    return model
