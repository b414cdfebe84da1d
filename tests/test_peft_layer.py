"""The R-LoRA layer against the spec: exact at init, equal to a per-head reference, a bf16 base, dropout (none in
eval), gradients, init."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import MLP, SIZES, adapted_layers, greedy, perturb, tiny_llama, tokens
from torch import nn
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlora_plugin import RLoraConfig, RLoraLinear


class FixedMask(nn.Module):
    """Stands in for the layer's dropout module so a test knows the masks."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.mask


def reference_update(
    layer: RLoraLinear,
    x: torch.Tensor,
    config: RLoraConfig,
    initial: RLoraLinear | None = None,
    head_masks: list[torch.Tensor] | None = None,
):
    """The method written out head by head, as in docs/method.md#the-layer, with the scaling, the temperature and the
    offset computed from `config` (never read from the layer under test); `initial` is the same layer of an
    untrained twin model, whose `A` and heads `B_i` give the offset `s * mean_i(B_i^0) A^0 x`."""
    n, r = config.num_heads, config.r
    s = config.lora_alpha / (r**0.5 if config.use_rslora else r)
    a = layer.rlora_A["default"]
    heads = layer.rlora_B["default"].view(layer.out_features, n, r)
    h = x @ a.T
    if config.num_heads > 1:
        gates = torch.softmax((x @ layer.rlora_router["default"].T) / config.router_temperature, dim=-1)
    else:  # one head, no router
        gates = torch.ones(*x.shape[:-1], 1)
    out = torch.zeros(*x.shape[:-1], layer.out_features)
    for i in range(n):
        h_i = h if head_masks is None else h * head_masks[i]
        out = out + gates[..., i : i + 1] * (h_i @ heads[:, i, :].T)
    out = s * out
    if config.init == "random" and config.init_weights:
        mean_head = initial.rlora_B["default"].detach().view(layer.out_features, n, r).mean(dim=1)
        out = out - s * (x @ initial.rlora_A["default"].detach().T) @ mean_head.T
    return out


def perturbed_layer(config: RLoraConfig) -> tuple[RLoraLinear, RLoraLinear]:
    """The first adapted layer of a model whose adapter weights moved as in training, and the same layer of
    an untouched twin (the initial weights)."""
    model = get_peft_model(tiny_llama(), config)
    perturb(model)
    return adapted_layers(model)[0], adapted_layers(get_peft_model(tiny_llama(), config))[0]


@pytest.mark.parametrize("init", ["random", "zero"])
@pytest.mark.parametrize("num_heads", [1, 3, 5])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapted_model_equals_base_at_init(init, num_heads, use_rslora):
    base = tiny_llama()
    ids = tokens()
    expected = base(ids).logits
    config = RLoraConfig(target_modules=MLP, init=init, num_heads=num_heads, use_rslora=use_rslora, r=4)
    model = get_peft_model(base, config).eval()
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
    update = adapted_layers(model)[0].routed_update(torch.randn(3, 32), "default")
    if init == "random":  # the heads are live; only the offset path cancels them
        assert adapted_layers(model)[0].rlora_B["default"].abs().sum() > 0
    assert update.abs().max() < 1e-6


def test_equal_at_init_with_layers_to_transform():
    base = tiny_llama()
    ids = tokens()
    expected = base(ids).logits
    config = RLoraConfig(target_modules=MLP, layers_to_transform=[1], layers_pattern="layers")
    model = get_peft_model(base, config).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, RLoraLinear)]
    assert names and all(".layers.1." in n for n in names)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)


ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **SIZES)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **SIZES)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(num_key_value_heads=2, **SIZES)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    ),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_all_linear(arch):
    torch.manual_seed(0)
    base = ARCHITECTURES[arch]().eval()
    ids = tokens()
    expected = base(ids).logits
    model = get_peft_model(base, RLoraConfig(target_modules="all-linear"))
    layers = adapted_layers(model)
    linear_count = sum(isinstance(m, nn.Linear) for m in base.modules()) - 1  # all but the output layer
    assert len(layers) == linear_count
    model.eval()
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(layer.rlora_B["default"].grad is not None for layer in layers)


@pytest.mark.parametrize("head_dropout", ["per_head", "shared"])
@pytest.mark.parametrize("router_init", ["zero", "kaiming"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_fused_layer_equals_per_head_reference(head_dropout, router_init, use_rslora):
    config = RLoraConfig(
        target_modules=MLP,
        num_heads=4,
        r=3,
        lora_alpha=5,
        use_rslora=use_rslora,
        head_dropout=head_dropout,
        router_init=router_init,
        router_temperature=0.7,
        lora_dropout=0.3,
    )
    layer, initial = perturbed_layer(config)
    x = torch.randn(2, 5, layer.in_features)
    layer.eval()
    torch.testing.assert_close(layer.routed_update(x, "default"), reference_update(layer, x, config, initial))

    layer.train()
    keep = torch.rand(2, 5, 4, 3, generator=torch.Generator().manual_seed(7)) > 0.3
    masks = keep.float() / 0.7
    if head_dropout == "shared":
        masks = masks[..., 0, :]  # one mask of shape (..., r), for all heads
        layer.rlora_dropout["default"] = FixedMask(masks)
        head_masks = [masks] * 4
    else:
        layer.rlora_dropout["default"] = FixedMask(masks)
        head_masks = [masks[..., i, :] for i in range(4)]
    torch.testing.assert_close(
        layer.routed_update(x, "default"), reference_update(layer, x, config, initial, head_masks)
    )


@pytest.mark.parametrize("shape", [(2, 5), (5,), ()], ids=["batch-seq", "tokens", "one-vector"])
def test_layer_output_is_base_plus_update_with_gradients(shape):
    """The forward adds the update into the base output inside the second matmul (addmm); the result and
    every gradient equal base(x) + the per-head reference, for any number of leading dimensions."""
    config = RLoraConfig(target_modules=MLP, num_heads=3, r=4, lora_dropout=0.0)
    layer, initial = perturbed_layer(config)
    layer.train()
    x = torch.randn(*shape, layer.in_features, requires_grad=True)
    fused = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    expected = layer.base_layer(ref_x) + reference_update(layer, ref_x, config, initial)
    torch.testing.assert_close(fused, expected)
    weights = [layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"]]
    grad_out = torch.randn_like(fused)
    got = torch.autograd.grad(fused, [x, *weights], grad_out)
    want = torch.autograd.grad(expected, [ref_x, *weights], grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_bf16_base_with_fp32_adapter():
    """PEFT keeps the adapter of a bf16 base in fp32: the model is exact at init and trains with fp32 gradients;
    each layer adds its fp32 update in the base's dtype; trained, the model generates like the same weights in
    fp32, the bf16 rounding of the base moving the logits far less than the adapter does."""
    config = RLoraConfig(target_modules=MLP, num_heads=3, r=4, init_seed=3)
    base, ids = tiny_llama().to(torch.bfloat16), tokens()
    expected = base(ids).logits
    model = get_peft_model(base, config)
    layer = adapted_layers(model)[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "rlora_" in n} == {torch.float32}
    assert layer.rlora_offset_B["default"].dtype == torch.float32
    model.eval()
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-2)
    model.train()
    loss = model(ids, labels=ids).loss
    assert loss.dtype == torch.float32  # transformers computes the loss in fp32 from the bf16 logits
    loss.backward()
    assert layer.rlora_B["default"].grad.dtype == torch.float32

    # Perturbation 1: no near-tie on the greedy path (its smallest top-2 logit gap, 0.0067, is over twice the
    # bf16 error, 0.0028), so equal tokens test the dtype path, not a coin flip (seed 3: a gap of 0.0014).
    perturb(model, seed=1)
    model.eval()
    alone, initial = perturbed_layer(config)  # one layer, its base weight then cast to bf16
    alone.eval().base_layer.to(torch.bfloat16)
    x = torch.randn(2, 5, alone.in_features, dtype=torch.bfloat16)
    out = alone(x)
    assert out.dtype == torch.bfloat16
    update = reference_update(alone, x.float(), config, initial).to(torch.bfloat16)
    torch.testing.assert_close(out, alone.base_layer(x) + update)
    with torch.no_grad():
        trained = model(ids).logits
        assert trained.dtype == torch.bfloat16 and torch.isfinite(trained).all()
        with model.disable_adapter():
            assert not torch.equal(trained, model(ids).logits)
        reference = get_peft_model(tiny_llama(), config)
        perturb(reference, seed=1)
        reference.eval()
        in_fp32 = reference(ids).logits
        with reference.disable_adapter():
            adapter_effect = (in_fp32 - reference(ids).logits).abs().max()
    assert (trained.float() - in_fp32).abs().max() < 0.1 * adapter_effect
    assert torch.equal(greedy(model, ids), greedy(reference, ids))


def dropped_features(layer: RLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """What the dropout module let through, captured from the real nn.Dropout during a training forward."""
    seen = []
    handle = layer.rlora_dropout["default"].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    layer.train()
    layer.routed_update(x, "default")
    handle.remove()
    return seen[0]


def test_per_head_masks_are_independent():
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, num_heads=4, lora_dropout=0.5))
    layer = adapted_layers(model)[0]
    kept = dropped_features(layer, torch.randn(512, layer.in_features)) != 0  # (tokens, heads, r)
    assert kept.shape == (512, 4, 8)
    assert abs(kept.float().mean().item() - 0.5) < 0.03
    for i in range(1, 4):  # independent masks agree on about half the entries, identical ones on all
        agreement = (kept[:, 0] == kept[:, i]).float().mean().item()
        assert abs(agreement - 0.5) < 0.03


def test_shared_dropout_uses_one_mask():
    config = RLoraConfig(target_modules=MLP, num_heads=4, lora_dropout=0.5, head_dropout="shared")
    layer = adapted_layers(get_peft_model(tiny_llama(), config))[0]
    x = torch.randn(512, layer.in_features)
    kept = dropped_features(layer, x) != 0
    assert kept.shape == (512, 8)  # dropout acts on h before the heads: one mask serves all of them
    assert abs(kept.float().mean().item() - 0.5) < 0.03


def test_eval_mode_has_no_dropout_and_is_deterministic():
    """With dropout configured, training forwards differ, while eval ones equal the reference without dropout
    and repeat bit for bit, as does greedy generation."""
    config = RLoraConfig(target_modules=MLP, lora_dropout=0.5, router_init="kaiming")
    model = get_peft_model(tiny_llama(), config)
    perturb(model)
    layer, initial = adapted_layers(model)[0], adapted_layers(get_peft_model(tiny_llama(), config))[0]
    x, ids = torch.randn(4, layer.in_features), tokens()
    model.train()
    assert not torch.equal(layer.routed_update(x, "default"), layer.routed_update(x, "default"))
    model.eval()
    torch.testing.assert_close(layer.routed_update(x, "default"), layer.routed_update(x, "default"))
    torch.testing.assert_close(layer.routed_update(x, "default"), reference_update(layer, x, config, initial))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert torch.equal(greedy(model, ids), greedy(model, ids))


def test_gradients_reach_adapter_not_base():
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, num_heads=3))
    model.train()
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    for layer in adapted_layers(model):
        grad_b = layer.rlora_B["default"].grad.view(layer.out_features, 3, -1)
        assert layer.rlora_A["default"].grad.abs().sum() > 0
        assert all(grad_b[:, i].abs().sum() > 0 for i in range(3))
        assert layer.rlora_router["default"].grad.abs().sum() > 0
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
        assert not layer.rlora_offset_A["default"].requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if "rlora_" not in n)


def head_blocks(layer: RLoraLinear) -> torch.Tensor:
    return layer.rlora_B["default"].detach().view(layer.out_features, layer.num_heads["default"], -1)


def test_init_is_deterministic_per_seed_and_different_across_heads():
    def build(seed):
        return adapted_layers(get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, init_seed=seed)))

    first, again, other = build(0), build(0), build(1)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.rlora_A["default"], b.rlora_A["default"])
        assert torch.equal(a.rlora_B["default"], b.rlora_B["default"])
    assert not torch.equal(first[0].rlora_B["default"], other[0].rlora_B["default"])
    assert not torch.equal(first[0].rlora_A["default"], first[1].rlora_A["default"])  # per layer, too
    heads = head_blocks(first[0]).permute(1, 0, 2).flatten(1)
    cosine = torch.nn.functional.cosine_similarity(heads[:, None], heads[None, :], dim=-1)
    off_diagonal = cosine[~torch.eye(len(heads), dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.3  # independent draws, not copies


def test_random_init_scale_follows_spec():
    config = RLoraConfig(target_modules=["down_proj"], r=16, num_heads=10, init_gamma=16)
    layer = adapted_layers(get_peft_model(tiny_llama(), config))[0]  # down_proj: 48 -> 32
    scale = 32**0.25 / 16**0.5
    assert layer.rlora_A["default"].std().item() == pytest.approx(scale / 48**0.5, rel=0.1)
    assert layer.rlora_B["default"].std().item() == pytest.approx(scale / 32**0.5, rel=0.1)
    assert torch.equal(layer.rlora_router["default"], torch.zeros(10, 48))


def test_one_zero_head_is_plain_lora():
    ids = tokens()
    rlora = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, num_heads=1, init="zero", r=4)).eval()
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=MLP, r=4, lora_alpha=16)).eval()
    perturb(rlora)
    for ours, theirs in zip(adapted_layers(rlora), [m for m in lora.modules() if hasattr(m, "lora_A")], strict=True):
        theirs.lora_A["default"].weight.data.copy_(ours.rlora_A["default"])
        theirs.lora_B["default"].weight.data.copy_(ours.rlora_B["default"])
    torch.testing.assert_close(rlora(ids).logits, lora(ids).logits, rtol=1e-6, atol=1e-6)


def test_one_head_has_no_router_and_trains_every_parameter(tmp_path):
    """A single softmax logit is constant: one head keeps no router (its gate is 1), so every trainable
    parameter learns, and saving, reloading and the metrics work without it."""
    from peft import PeftModel

    from rlora_plugin.metrics import MetricsCollector, RouterAuxLoss

    config = RLoraConfig(target_modules=MLP, num_heads=1, r=4, router_init="kaiming")
    model = get_peft_model(tiny_llama(), config)
    assert not any("rlora_router" in n for n, _ in model.named_parameters())
    layer, initial = adapted_layers(model)[0].eval(), perturbed_layer(config)[1]
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer.routed_update(x, "default"), reference_update(layer, x, config, initial))
    model.train()
    ids = tokens()
    collector, aux = MetricsCollector(model).enable(), RouterAuxLoss(model)
    aux.start()
    model(ids, labels=ids).loss.backward()
    assert float(aux.stop()) == pytest.approx(1.0)  # N * f * P = 1 for one head
    assert collector.compute()["rlora/router_entropy"] == 0.0
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    perturb(model)
    model.eval()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, expected)


@pytest.mark.parametrize("init", ["random", "zero"])
def test_init_weights_false_is_not_an_identity(init):
    """PEFT's `init_weights=False`: no offset path and no zero heads, so the adapter changes the output
    from the start (upstream tests need it); the default stays exact."""
    base = tiny_llama()
    ids = tokens()
    expected = base(ids).logits
    config = RLoraConfig(target_modules=MLP, init=init, r=4, init_weights=False)
    model = get_peft_model(base, config).eval()
    layer = adapted_layers(model)[0]
    assert len(layer.rlora_offset_A) == len(layer.rlora_offset_B) == 0
    assert layer.rlora_B["default"].abs().min() > 0
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer.routed_update(x, "default"), reference_update(layer, x, config))
    assert (model(ids).logits - expected).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"RLoraConfig: `init_weights: 'no'` is invalid. Fix: use true or false"):
        RLoraConfig(init_weights="no")


def test_router_temperature_sharpens_gates():
    from rlora_plugin.metrics import normalized_entropy

    config = RLoraConfig(target_modules=MLP, router_init="kaiming", router_temperature=0.05)
    layer, initial = perturbed_layer(config)
    layer.eval()
    x = torch.randn(4, 32)
    gates = []
    layer.gate_observers.append(lambda _layer, _probs, applied, _chosen: gates.append(applied))
    cold = layer.routed_update(x, "default")
    torch.testing.assert_close(cold, reference_update(layer, x, config, initial))
    layer.router_temperature["default"] = 1.0
    assert not torch.allclose(cold, layer.routed_update(x, "default"))
    cold_gates, warm_gates = gates
    assert (normalized_entropy(cold_gates) < normalized_entropy(warm_gates)).all()  # sharper for every token


def test_training_steps_lower_the_loss():
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, lora_alpha=32))
    model.train()
    ids = tokens(batch=4, length=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize(
    ("init", "head_dropout", "router_init", "heads_stay_equal"),
    [
        ("zero", "shared", "zero", True),  # HydraLoRA with a zero router: every head gets the same gradient
        ("zero", "shared", "kaiming", False),  # a random router breaks the symmetry (the authors' code)
        ("zero", "per_head", "zero", False),  # so do per-head dropout masks
        ("random", "shared", "zero", False),  # and random heads
    ],
)
def test_what_makes_heads_differ(init, head_dropout, router_init, heads_stay_equal):
    """Trained with AdamW, the heads of HydraLoRA with zero B, one dropout mask and a zero router stay exact
    copies (it is one LoRA of rank r); each of R-LoRA's ingredients, or a random router, makes them differ."""
    config = RLoraConfig(
        target_modules=MLP, num_heads=3, r=4, init=init, head_dropout=head_dropout, router_init=router_init,
        lora_dropout=0.1,
    )  # fmt: skip
    model = get_peft_model(tiny_llama(), config).train()
    ids = tokens(batch=4, length=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    spreads = []  # per layer: the largest distance of a head from head 0, relative to head 0's norm
    for layer in adapted_layers(model):
        heads = layer.rlora_B["default"].detach().view(layer.out_features, 3, 4).unbind(1)
        spreads.append(max(float((h - heads[0]).norm() / heads[0].norm()) for h in heads[1:]))
    if heads_stay_equal:
        assert max(spreads) < 1e-6
    else:
        assert min(spreads) > 1e-3
