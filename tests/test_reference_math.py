"""The shared math of the method (rlora_plugin/layer.py, metrics.py, export.py) against references written out here
by hand: loops over heads and tokens, explicit sorting, dense matrices and literal numbers.

The PEFT layer, the vLLM plugin, torch.compile and the export all call the same `routed_update`, `top_k_gates` and
`frozen_gate_lora`, so tests that compare one of those callers with another cannot see a bug inside the shared
function. Every expected value below is computed without calling any function of rlora_plugin.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import MLP, adapted_layers, model_with, perturb

import rlora_plugin.layer as layer_module
from rlora_plugin import RLoraConfig, RLoraLinear
from rlora_plugin.export import export_lora
from rlora_plugin.layer import adapter_scaling, frozen_gate_lora, routed_update, top_k_gates
from rlora_plugin.metrics import (
    head_cosine_B,
    head_cosine_BA,
    load_balancing_loss,
    load_ratio,
    low_rank_norm,
    mean_off_diagonal,
    normalized_entropy,
    similarity_metrics,
)

D_IN, D_OUT, R = 10, 7, 3
FP32_SOFTMAX = dict(atol=1e-5, rtol=1e-5)  # the router's softmax runs in float32 by design, even for float64 inputs


# ---------------------------------------------------------------------------- hand-written references
def hand_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """exp(z / T) / sum exp(z / T) over the last dimension (small logits: no max subtraction needed)."""
    e = torch.exp(logits / temperature)
    return e / e.sum(-1, keepdim=True)


def hand_top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Token by token: sort the probabilities in descending order, keep the first k, divide them by their sum and
    put zeros elsewhere. Returns the gates and the kept indices of each token (flattened tokens)."""
    n = probs.shape[-1]
    flat = probs.reshape(-1, n)
    out = torch.zeros_like(flat)
    kept_per_token = []
    for t in range(flat.shape[0]):
        row = flat[t].tolist()
        kept = sorted(range(n), key=lambda i: row[i], reverse=True)[:k]
        total = sum(row[i] for i in kept)
        for i in kept:
            out[t, i] = row[i] / total
        kept_per_token.append(kept)
    return out.reshape(probs.shape), kept_per_token


def hand_update(
    x: torch.Tensor,
    a: torch.Tensor,
    router: torch.Tensor | None,
    heads: list[torch.Tensor],
    s: float,
    temperature: float = 1.0,
    a0: torch.Tensor | None = None,
    b0: torch.Tensor | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """`s * sum_i g_i(x) B_i A x - s * Bbar0 A0 x`, one head at a time; `g = softmax(W_g x / T)` (top-k by hand),
    the single gate 1 without a router."""
    if router is None:
        gates = torch.ones(*x.shape[:-1], 1, dtype=x.dtype)
    else:
        gates = hand_softmax(x @ router.T, temperature)
        if top_k is not None:
            gates = hand_top_k(gates, top_k)[0]
    h = x @ a.T
    out = torch.zeros(*x.shape[:-1], heads[0].shape[0], dtype=x.dtype)
    for i, b_i in enumerate(heads):
        out = out + s * gates[..., i : i + 1] * (h @ b_i.T)
    if a0 is not None:
        out = out - s * (x @ a0.T) @ b0.T
    return out


def head_list(lora_b: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """Head i of `B_cat (d_out, N*r)` is columns `i*r:(i+1)*r`, sliced by hand."""
    r = lora_b.shape[1] // num_heads
    return [lora_b[:, i * r : (i + 1) * r] for i in range(num_heads)]


def hand_cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.flatten().double(), v.flatten().double()
    return float((u * v).sum() / (u.pow(2).sum().sqrt() * v.pow(2).sum().sqrt()))


def mean_pairwise(values: list[torch.Tensor]) -> float:
    """Mean of the cosines of all ordered pairs i != j."""
    pairs = [hand_cosine(u, v) for i, u in enumerate(values) for j, v in enumerate(values) if i != j]
    return sum(pairs) / len(pairs)


def hand_balance_loss(probs: torch.Tensor, k: int | None = None, mask: torch.Tensor | None = None) -> float:
    """`N * sum_i f_i P_i` over the real tokens, token by token: f_i counts the top-1 (argmax) choice, or each of
    the top-k choices (sorted by hand) as 1/k; P_i is the mean probability."""
    n = probs.shape[-1]
    rows = probs.reshape(-1, n).tolist()
    real = [True] * len(rows) if mask is None else [bool(m) for m in mask.reshape(-1).tolist()]
    counts, sums, tokens = [0.0] * n, [0.0] * n, 0
    for row, is_real in zip(rows, real, strict=True):
        if not is_real:
            continue
        tokens += 1
        choices = sorted(range(n), key=lambda i: row[i], reverse=True)[: k or 1]
        for c in choices:
            counts[c] += 1 / len(choices)
        for i in range(n):
            sums[i] += row[i]
    return n * sum((counts[i] / tokens) * (sums[i] / tokens) for i in range(n))


def random_weights(heads: int, seed: int = 0, dtype=torch.float64):
    """A, W_g (None for one head), the heads B_i, A0, Bbar0 and inputs of the small test sizes."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    router = draw(heads, D_IN) if heads > 1 else None
    return draw(R, D_IN), router, [draw(D_OUT, R) for _ in range(heads)], draw(R, D_IN), draw(D_OUT, R), gen


def weights(a, router, heads, a0=None, b0=None):
    """`(A, [B_1 .. B_N], W_g)` and the offset `(A0, Bbar0)` or None, as `routed_update` takes them."""
    return (a, torch.cat(heads, dim=1), router), ((a0, b0) if a0 is not None else None)


# ---------------------------------------------------------------------------- 1. routed_update
@pytest.fixture(params=["stacked", "separate"])
def products(request, monkeypatch):
    """Both ways `routed_update` runs: the weights copied into one down- and one up-projection (many tokens), or
    a product per weight (few tokens)."""
    monkeypatch.setattr(layer_module, "STACK_FROM_TOKENS", 0 if request.param == "stacked" else 10**9)
    return request.param


@pytest.mark.parametrize("shape", [(2, 5), (6,)], ids=["B,T,d", "T,d"])
@pytest.mark.parametrize("offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("num_heads", [1, 3, 4])
def test_routed_update_equals_per_head_loop(num_heads, offset, shape, products):
    """The fused update equals the per-head loop: guards the head layout of B_cat, the gate scaling and the sign
    of the offset path (`-s * Bbar0 A0 x`)."""
    a, router, heads, a0, b0, gen = random_weights(num_heads)
    x = torch.randn(*shape, D_IN, generator=gen, dtype=torch.float64)
    s = 0.75
    args, offset_path = weights(a, router, heads, *((a0, b0) if offset else ()))
    got = routed_update(x, *args, scaling=s, offset=offset_path)
    want = hand_update(x, a, router, heads, s, a0=a0 if offset else None, b0=b0)
    assert got.shape == (*shape, D_OUT)
    torch.testing.assert_close(got, want, **FP32_SOFTMAX)


@pytest.mark.parametrize("offset", [False, True], ids=["no-offset", "offset"])
def test_routed_update_with_the_input_split_over_two_ranks(offset):
    """Tensor parallelism's row-parallel layers: each rank holds half the input features and the matching
    columns of `A`, `W_g` and `A0`; `reduce` adds the other rank's down-projection (its all-reduce) before the
    softmax, and each rank's update is the whole layer's, by hand."""
    a, router, heads, a0, b0, gen = random_weights(3)
    x = torch.randn(2, 5, D_IN, generator=gen, dtype=torch.float64)
    half = D_IN // 2
    (first, second) = (slice(None, half), slice(half, None))
    offset_path = (a0[:, first], b0) if offset else None

    def other_rank(down: torch.Tensor) -> torch.Tensor:
        downs = [a[:, second], router[:, second], *([a0[:, second]] if offset else [])]
        return down + x[..., second] @ torch.cat(downs).T

    got = routed_update(x[..., first], a[:, first], torch.cat(heads, dim=1), router[:, first], scaling=0.75,
                        offset=offset_path, reduce=other_rank)  # fmt: skip
    want = hand_update(x, a, router, heads, 0.75, a0=a0 if offset else None, b0=b0)
    torch.testing.assert_close(got, want, **FP32_SOFTMAX)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("offset", [False, True], ids=["no-offset", "offset"])
def test_routed_update_with_top_k_equals_hand_top_k(k, offset, products):
    """Top-k routing through `route=top_k_gates` equals the loop with top-k computed by hand (sort, keep k,
    renormalize): guards the renormalization and the gates' use in the fused product."""
    a, router, heads, a0, b0, gen = random_weights(4, seed=1)
    x = torch.randn(2, 5, D_IN, generator=gen, dtype=torch.float64)
    args, offset_path = weights(a, router, heads, *((a0, b0) if offset else ()))
    got = routed_update(x, *args, scaling=1.5, offset=offset_path, route=lambda p: top_k_gates(p, k)[0])
    want = hand_update(x, a, router, heads, 1.5, a0=a0 if offset else None, b0=b0, top_k=k)
    torch.testing.assert_close(got, want, **FP32_SOFTMAX)


@pytest.mark.parametrize("shape", [(2, 5), (6,)], ids=["B,T,d", "T,d"])
@pytest.mark.parametrize("num_heads", [1, 3])
def test_routed_update_add_to_addmm_path(num_heads, shape, products):
    """`add_to` of the adapter's dtype takes the fused addmm path: it returns base + update, for (B, T, d) and
    (T, d) inputs (guards the flatten/view around addmm and the transposed heads)."""
    a, router, heads, a0, b0, gen = random_weights(num_heads, seed=2)
    x = torch.randn(*shape, D_IN, generator=gen, dtype=torch.float64)
    base = torch.randn(*shape, D_OUT, generator=gen, dtype=torch.float64)
    args, offset_path = weights(a, router, heads, a0, b0)
    got = routed_update(x, *args, scaling=0.5, offset=offset_path, add_to=base.clone())
    torch.testing.assert_close(got, base + hand_update(x, a, router, heads, 0.5, a0=a0, b0=b0), **FP32_SOFTMAX)


def test_routed_update_add_to_fp32_add_path(products):
    """`add_to` of another dtype (a float32 base with a float64 adapter) or a single vector takes the plain add
    path: base + update, in the base's dtype."""
    a, router, heads, a0, b0, gen = random_weights(3, seed=3)
    args, offset_path = weights(a, router, heads, a0, b0)
    x = torch.randn(2, 5, D_IN, generator=gen, dtype=torch.float64)
    base = torch.randn(2, 5, D_OUT, generator=gen, dtype=torch.float32)
    got = routed_update(x, *args, scaling=0.5, offset=offset_path, add_to=base)
    assert got.dtype == torch.float32
    want = base + hand_update(x, a, router, heads, 0.5, a0=a0, b0=b0).float()
    torch.testing.assert_close(got, want, **FP32_SOFTMAX)
    one = torch.randn(D_IN, generator=gen, dtype=torch.float64)  # one vector: no matrix for addmm
    base_one = torch.randn(D_OUT, generator=gen, dtype=torch.float64)
    got = routed_update(one, *args, scaling=0.5, offset=offset_path, add_to=base_one)
    torch.testing.assert_close(got, base_one + hand_update(one, a, router, heads, 0.5, a0=a0, b0=b0), **FP32_SOFTMAX)


# ---------------------------------------------------------------------------- 2. top_k_gates
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 5)], ids=["T,N", "B,T,N"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gates_equals_sort_keep_renormalize(shape, k):
    """Sort descending, keep k, divide by their sum, zeros elsewhere (a softmax over the kept k, or no
    renormalization, would differ); the chosen indices are the kept ones."""
    gen = torch.Generator().manual_seed(k)
    probs = torch.softmax(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)
    gates, chosen = top_k_gates(probs, k)
    want, kept = hand_top_k(probs, k)
    torch.testing.assert_close(gates, want)
    assert chosen.shape == (*shape[:-1], k)
    assert [sorted(c) for c in chosen.reshape(-1, k).tolist()] == [sorted(c) for c in kept]


def test_top_k_gates_known_values():
    """A literal case: (0.5, 0.3, 0.2) keeps (0.5, 0.3) -> (0.625, 0.375, 0)."""
    gates, chosen = top_k_gates(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64), 2)
    torch.testing.assert_close(gates, torch.tensor([[0.0, 0.625, 0.375]], dtype=torch.float64))
    assert sorted(chosen[0].tolist()) == [1, 2]


@pytest.mark.parametrize("k", [None, 0, 4, 7])
def test_top_k_gates_dense_when_k_is_off_or_covers_all_heads(k):
    """None, 0 and k >= N are dense routing: the probabilities unchanged and no choice."""
    probs = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    gates, chosen = top_k_gates(probs, k)
    assert chosen is None
    assert torch.equal(gates, probs)


# ---------------------------------------------------------------------------- 3. router temperature
@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_routed_update_temperature_divides_the_logits(temperature, products):
    """Gates = exp(z/T) / sum exp(z/T): guards a temperature that multiplies, or is ignored."""
    a, router, heads, _, _, gen = random_weights(3, seed=4)
    x = torch.randn(2, 5, D_IN, generator=gen, dtype=torch.float64)
    args, _ = weights(a, router, heads)
    got = routed_update(x, *args, scaling=1.0, temperature=temperature)
    torch.testing.assert_close(got, hand_update(x, a, router, heads, 1.0, temperature=temperature), **FP32_SOFTMAX)
    assert not torch.allclose(got, hand_update(x, a, router, heads, 1.0))  # T matters here


def test_peft_layer_temperature_equals_hand_softmax():
    """An `RLoraLinear` built by PEFT with `router_temperature=0.4`: output = base + the hand reference from the
    layer's own parameters, with s = 8 / 4 = 2.0 and T = 0.4 written as literals."""
    model = model_with(router_temperature=0.4, router_init="kaiming", lora_alpha=8)
    perturb(model)
    layer = adapted_layers(model)[0].eval()
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x) + hand_update(
            x, layer.rlora_A["default"], layer.rlora_router["default"], head_list(layer.rlora_B["default"], 3),
            2.0, temperature=0.4, a0=layer.rlora_offset_A["default"], b0=layer.rlora_offset_B["default"],
        )  # fmt: skip
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- 4. scaling
@pytest.mark.parametrize(
    ("alpha", "r", "rslora", "expected"),
    [(16, 4, False, 4.0), (16, 4, True, 8.0), (6, 9, False, 6 / 9), (6, 9, True, 2.0), (8, 1, True, 8.0)],
)
def test_adapter_scaling_literals(alpha, r, rslora, expected):
    """alpha / r, or alpha / sqrt(r) with rsLoRA, as literal numbers."""
    assert adapter_scaling(RLoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora)) == pytest.approx(expected)


@pytest.mark.parametrize(("rslora", "s"), [(False, 4.0), (True, 8.0)], ids=["alpha/r", "rslora"])
def test_peft_layer_output_uses_the_scaling(rslora, s):
    """A PEFT-built layer (alpha 16, r 4) outputs base + the hand reference at s = 4.0 (8.0 with rsLoRA), offset
    path included: guards a layer that ignores or misreads its scaling."""
    model = model_with(r=4, lora_alpha=16, use_rslora=rslora, router_init="kaiming")
    perturb(model)
    for layer in adapted_layers(model)[:2]:
        layer.eval()
        x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            got = layer(x)
            want = layer.base_layer(x) + hand_update(
                x, layer.rlora_A["default"], layer.rlora_router["default"], head_list(layer.rlora_B["default"], 3),
                s, a0=layer.rlora_offset_A["default"], b0=layer.rlora_offset_B["default"],
            )  # fmt: skip
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- 5. load_balancing_loss
TINY = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64)  # 2 tokens, 3 heads


def test_load_balancing_loss_literal_values():
    """2 tokens x 3 heads, by hand. P = (0.45, 0.35, 0.2). Top-1: f = (1/2, 1/2, 0), loss = 3 * (0.225 + 0.175)
    = 1.2. Top-2: f = (1/4, 1/2, 1/4), loss = 3 * (0.1125 + 0.175 + 0.05) = 1.0125. A third, padded token changes
    nothing under the mask (without it, f = (1/3, 1/3, 1/3) and the loss is sum_i P_i = 1.0)."""
    assert float(load_balancing_loss(TINY)) == pytest.approx(1.2)
    chosen = torch.tensor([[0, 1], [1, 2]])
    assert float(load_balancing_loss(TINY, chosen)) == pytest.approx(1.0125)
    padded = torch.cat([TINY, torch.tensor([[0.1, 0.1, 0.8]], dtype=torch.float64)])[None]  # (B=1, T=3, N=3)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert float(load_balancing_loss(padded, token_mask=mask)) == pytest.approx(1.2)
    assert float(load_balancing_loss(padded)) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [None, 1, 2, 3])
@pytest.mark.parametrize("masked", [False, True], ids=["all-real", "padding"])
def test_load_balancing_loss_equals_hand_loop(k, masked):
    """`N * sum_i f_i P_i` against the token loop: f from the argmax (or each of the top-k choices counting 1/k),
    padded tokens out of both f and P."""
    gen = torch.Generator().manual_seed(11)
    probs = torch.softmax(torch.randn(2, 6, 4, generator=gen, dtype=torch.float64) * 2, dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool) if masked else None
    chosen = None if k is None else probs.topk(k, dim=-1).indices
    got = load_balancing_loss(probs, chosen, mask)
    assert float(got) == pytest.approx(hand_balance_loss(probs, k, mask), rel=1e-6)


def test_load_balancing_loss_fraction_carries_no_gradient():
    """Only P carries the gradient (f comes from the argmax counts): d loss / d p_{t,i} = N * f_i / tokens for a
    real token and 0 for a padded one, by hand (guards the mask in P and a gradient through f)."""
    gen = torch.Generator().manual_seed(12)
    probs = torch.softmax(torch.randn(1, 5, 3, generator=gen, dtype=torch.float64), dim=-1).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    (grad,) = torch.autograd.grad(load_balancing_loss(probs, token_mask=mask), probs)
    rows = probs.detach()[0].tolist()
    f = [0.0] * 3
    for row in rows[:4]:
        f[max(range(3), key=lambda i: row[i])] += 1 / 4
    want = torch.tensor([[[3 * f[i] / 4 for i in range(3)]] * 4 + [[0.0] * 3]], dtype=torch.float64)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)  # the loss is computed in float32


# ---------------------------------------------------------------------------- 6. frozen-gate export
@pytest.mark.parametrize("offset", [False, True], ids=["no-offset", "offset"])
def test_frozen_gate_lora_equals_dense_matrix(offset):
    """B' A' equals the dense `s * sum_i c_i B_i A - s * Bbar0 A0` (d_out x d_in, loop over heads): guards the
    offset's sign, the gates' use and the head layout."""
    a, _, heads, a0, b0, _ = random_weights(4, seed=7)
    c, s = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64), 1.25
    dense = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    for i, b_i in enumerate(heads):
        dense += s * c[i] * b_i @ a
    if offset:
        dense -= s * b0 @ a0
    lora_a, lora_b = frozen_gate_lora(a, torch.cat(heads, dim=1), c, s, *((a0, b0) if offset else ()))
    assert lora_a.shape == ((2 if offset else 1) * R, D_IN)
    torch.testing.assert_close(lora_b @ lora_a, dense)


@pytest.mark.parametrize(("rslora", "s"), [(False, 2.0), (True, 4.0)], ids=["alpha/r", "rslora"])
def test_export_lora_equals_dense_reference_from_saved_tensors(tmp_path, rslora, s):
    """End to end: a saved random-init adapter (offset path present, alpha 8, r 4) exported with non-uniform gates.
    Each exported layer's `lora_B @ lora_A` (scaling 1: r == lora_alpha == 2r) equals the dense reference built from
    the saved R-LoRA tensors with s = 2.0 (4.0 with rsLoRA)."""
    model = model_with(r=4, lora_alpha=8, use_rslora=rslora)
    perturb(model)
    model.save_pretrained(tmp_path / "rlora")
    gates = torch.tensor([0.1, 0.6, 0.3])
    export_lora(tmp_path / "rlora", tmp_path / "lora", gates)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 8
    saved = load_file(tmp_path / "rlora" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    modules = sorted({key.rsplit(".rlora_", 1)[0] for key in saved if ".rlora_" in key})
    assert len(modules) == 2 * len(MLP)
    for module in modules:
        a, b = saved[f"{module}.rlora_A"].double(), saved[f"{module}.rlora_B"].double()
        a0, b0 = saved[f"{module}.rlora_offset_A"].double(), saved[f"{module}.rlora_offset_B"].double()
        dense = -s * b0 @ a0
        for i, b_i in enumerate(head_list(b, 3)):
            dense = dense + s * float(gates[i]) * b_i @ a
        got = exported[f"{module}.lora_B.weight"].double() @ exported[f"{module}.lora_A.weight"].double()
        torch.testing.assert_close(got, dense, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- 7. head-similarity metrics
def test_head_cosines_equal_hand_cosines():
    """cos(B_i, B_j) of the flattened heads and cos(B_i A, B_j A) of the dense updates, pair by pair, with the heads
    sliced by hand as columns `i*r:(i+1)*r` (guards a wrong head split and the trace form of the BA cosine)."""
    gen = torch.Generator().manual_seed(8)
    n, r, d_in, d_out = 4, 3, 12, 9
    lora_a, lora_b = torch.randn(r, d_in, generator=gen), torch.randn(d_out, n * r, generator=gen)
    heads = head_list(lora_b, n)
    cos_b, cos_ba = head_cosine_B(lora_b, n), head_cosine_BA(lora_a, lora_b, n)
    assert cos_b.shape == cos_ba.shape == (n, n)
    for i in range(n):
        for j in range(n):
            assert float(cos_b[i, j]) == pytest.approx(hand_cosine(heads[i], heads[j]), abs=1e-5)
            assert float(cos_ba[i, j]) == pytest.approx(hand_cosine(heads[i] @ lora_a, heads[j] @ lora_a), abs=1e-5)


def test_low_rank_norm_is_the_frobenius_norm_of_the_dense_product():
    """||B A||_F of the dense product (guards the trace form sqrt(tr(B^T B A A^T)))."""
    gen = torch.Generator().manual_seed(9)
    b, a = torch.randn(9, 3, generator=gen), torch.randn(3, 12, generator=gen)
    assert low_rank_norm(b, a) == pytest.approx(float(torch.linalg.norm(b.double() @ a.double())), rel=1e-5)


def test_mean_off_diagonal_entropy_and_load_ratio_by_hand():
    """Mean of the entries i != j; -sum p log p / log N per token (0 log 0 = 0); max / min mean gate."""
    m = torch.tensor([[1.0, 0.2, -0.4], [0.6, 1.0, 0.1], [0.3, 0.5, 1.0]])
    assert mean_off_diagonal(m) == pytest.approx((0.2 - 0.4 + 0.6 + 0.1 + 0.3 + 0.5) / 6)
    assert mean_off_diagonal(torch.ones(1, 1)) == 1.0
    gates = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    want = [-sum(p * math.log(p) for p in row if p > 0) / math.log(4) for row in gates.tolist()]
    torch.testing.assert_close(normalized_entropy(gates), torch.tensor(want))
    assert load_ratio(torch.tensor([0.2, 0.5, 0.3])) == pytest.approx(2.5)


def test_similarity_metrics_are_the_mean_over_layers_of_hand_cosines():
    """`similarity_metrics(model)` on a tiny PEFT model equals the mean over its layers of the mean pairwise hand
    cosines, overall and per module kind."""
    model = model_with(num_heads=3, r=4)
    perturb(model)
    per_layer_b, per_layer_ba, by_kind = [], [], {}
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, RLoraLinear)):
        a, heads = layer.rlora_A["default"].detach(), head_list(layer.rlora_B["default"].detach(), 3)
        per_layer_b.append(mean_pairwise(heads))
        per_layer_ba.append(mean_pairwise([h @ a for h in heads]))
        by_kind.setdefault(name.rsplit(".", 1)[1], []).append(per_layer_ba[-1])
    metrics = similarity_metrics(model)
    assert metrics["rlora/head_cos_B"] == pytest.approx(sum(per_layer_b) / len(per_layer_b), abs=1e-6)
    assert metrics["rlora/head_cos_BA"] == pytest.approx(sum(per_layer_ba) / len(per_layer_ba), abs=1e-6)
    for kind, values in by_kind.items():
        assert metrics[f"rlora/head_cos_BA/{kind}"] == pytest.approx(sum(values) / len(values), abs=1e-6)
