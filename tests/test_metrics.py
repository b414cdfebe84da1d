"""Router and head-diversity metrics, sparse top-k routing and the load-balancing loss, with known answers."""

import pytest
import torch
from tiny_models import MLP, SIZES, adapted_layers, model_with, tokens

from rlora_plugin.metrics import (
    MetricsCollector,
    RouterAuxLoss,
    head_cosine_B,
    head_cosine_BA,
    load_balancing_loss,
    mean_off_diagonal,
    normalized_entropy,
    similarity_metrics,
    split_heads,
)


def test_identical_heads_have_similarity_one():
    head = torch.randn(16, 4)
    lora_b = torch.cat([head, head, head], dim=1)
    lora_a = torch.randn(4, 24)
    torch.testing.assert_close(head_cosine_B(lora_b, 3), torch.ones(3, 3))
    torch.testing.assert_close(head_cosine_BA(lora_a, lora_b, 3), torch.ones(3, 3))
    assert mean_off_diagonal(head_cosine_BA(lora_a, lora_b, 3)) == pytest.approx(1.0)
    # opposite heads: -1; a head and its scaled copy: 1
    lora_b = torch.cat([head, -head, 2 * head], dim=1)
    cos = head_cosine_BA(lora_a, lora_b, 3)
    assert cos[0, 1] == pytest.approx(-1.0, abs=1e-5) and cos[0, 2] == pytest.approx(1.0, abs=1e-5)


def test_trace_form_equals_explicit_products():
    gen = torch.Generator().manual_seed(0)
    lora_a, lora_b = torch.randn(4, 24, generator=gen), torch.randn(16, 5 * 4, generator=gen)
    full = torch.stack([(h @ lora_a).flatten() for h in split_heads(lora_b, 5)])
    full = torch.nn.functional.normalize(full, dim=1)
    torch.testing.assert_close(head_cosine_BA(lora_a, lora_b, 5), full @ full.T, atol=1e-5, rtol=1e-5)
    flat = torch.nn.functional.normalize(split_heads(lora_b, 5).flatten(1), dim=1)
    torch.testing.assert_close(head_cosine_B(lora_b, 5), flat @ flat.T, atol=1e-5, rtol=1e-5)


def test_entropy_and_load_balancing_known_values():
    uniform = torch.full((7, 4), 0.25)
    torch.testing.assert_close(normalized_entropy(uniform), torch.ones(7))
    one_hot = torch.eye(4)
    torch.testing.assert_close(normalized_entropy(one_hot), torch.zeros(4))
    assert float(load_balancing_loss(uniform)) == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 5)
    assert float(load_balancing_loss(collapsed)) == pytest.approx(4.0)  # N when every token picks one head


def test_zero_router_gives_entropy_one_and_load_ratio_one():
    model = model_with().train()
    collector = MetricsCollector(model).enable()
    model(tokens())
    metrics = collector.compute()
    assert metrics["rlora/router_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["rlora/head_load_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["rlora/head_load_ratio_worst"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["rlora/head_load_max"] == pytest.approx(1 / 3, abs=1e-6)
    assert set(k for k in metrics if k.startswith("rlora/router_entropy/")) == {
        f"rlora/router_entropy/{kind}" for kind in MLP
    }
    # random init: distinct heads, similarity well below 1
    assert abs(metrics["rlora/head_cos_B"]) < 0.5 and abs(metrics["rlora/head_cos_BA"]) < 0.5
    assert collector.compute(similarities=False) == {}  # reset after compute; nothing recorded since


def test_only_training_forwards_are_recorded_and_disable_stops_it():
    model = model_with()
    collector = MetricsCollector(model).enable()
    model.eval()
    model(tokens())
    assert collector.gate_metrics() == {}
    collector.disable()
    model.train()
    model(tokens())
    assert collector.gate_metrics() == {}
    assert all(layer.gate_observers == [] for layer in adapted_layers(model)) and not model._forward_pre_hooks


def test_zero_init_heads_report_similarity_zero_for_hydralora():
    """B_i = 0 at HydraLoRA's init: the cosine is undefined and reported as 0 (never NaN); once the heads are
    equal and nonzero it is 1."""
    model = model_with(init="zero")
    metrics = similarity_metrics(model)
    assert set(metrics) >= {"rlora/head_cos_B", "rlora/head_cos_BA"}
    assert all(v == 0.0 for v in metrics.values()), metrics
    with torch.no_grad():
        for layer in adapted_layers(model):
            layer.rlora_B["default"].copy_(torch.randn(layer.out_features, 4).repeat(1, 3))
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in similarity_metrics(model).values())


def test_top1_gives_one_hot_gates_and_changes_the_output():
    dense, sparse = model_with(router_init="kaiming"), model_with(router_init="kaiming", router_top_k=1)
    layer = adapted_layers(sparse)[0]
    probs = torch.softmax(torch.randn(6, 3), dim=-1)
    gates = layer.route(probs, "default")
    assert ((gates == 0) | (gates == 1)).all() and (gates.sum(-1) == 1).all()
    assert torch.equal(gates.argmax(-1), probs.argmax(-1))
    top2 = model_with(router_top_k=2)
    gates = adapted_layers(top2)[0].route(probs, "default")
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(6))
    # the same weights with top-1 routing give another output
    sparse.load_state_dict(dense.state_dict())
    ids = tokens()
    assert not torch.allclose(dense.eval()(ids).logits, sparse.eval()(ids).logits)
    # top-1 gates: entropy 0
    collector = MetricsCollector(sparse.train()).enable()
    sparse(ids)
    assert collector.compute()["rlora/router_entropy"] == pytest.approx(0.0, abs=1e-6)


def test_aux_loss_changes_router_gradients():
    def router_grads(coef):
        model = model_with(router_init="kaiming").train()
        aux = RouterAuxLoss(model)
        aux.start()
        loss = model(tokens(), labels=tokens()).loss
        value = aux.stop()
        assert value is not None and value.requires_grad
        assert 1.0 <= float(value.detach()) <= 3.0  # between balanced (1) and collapsed (N)
        (loss + coef * value).backward()
        return torch.cat([layer.rlora_router["default"].grad.flatten() for layer in adapted_layers(model)])

    without, with_aux = router_grads(0.0), router_grads(1.0)
    assert not torch.allclose(without, with_aux)
    # nothing is recorded outside start()/stop(), nor in eval mode
    model = model_with()
    model.train()(tokens())
    assert all(layer.gate_observers == [] for layer in adapted_layers(model))
    aux = RouterAuxLoss(model)
    aux.start()
    model.eval()(tokens())
    assert aux.stop() is None
    model.train()(tokens())  # after stop(): computed (checkpoint recomputation must match) but not kept
    aux.start()
    assert aux.stop() is None
    aux.close()
    assert all(layer.gate_observers == [] for layer in adapted_layers(model)) and not model._forward_pre_hooks


def test_aux_loss_under_non_reentrant_gradient_checkpointing():
    model = model_with(router_init="kaiming")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    aux = RouterAuxLoss(model)
    padded = torch.ones_like(tokens())
    padded[0, 6:] = 0  # the recomputed forward must see the same padding mask as the original one
    for _ in range(2):  # the second step's forward follows a stop(): recomputation must match the forward
        aux.start()
        loss = model(tokens(), attention_mask=padded, labels=tokens()).loss
        value = aux.stop()
        (loss + 0.1 * value).backward()
    assert all(layer.rlora_router["default"].grad is not None for layer in adapted_layers(model))


def test_load_balancing_loss_leaves_masked_tokens_out():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 6, 4, generator=gen), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    real = probs[mask]
    torch.testing.assert_close(load_balancing_loss(probs, token_mask=mask), load_balancing_loss(real))
    chosen = probs.topk(2, dim=-1).indices
    torch.testing.assert_close(load_balancing_loss(probs, chosen, mask), load_balancing_loss(real, chosen[mask]))
    assert float(load_balancing_loss(probs, token_mask=torch.zeros(2, 6, dtype=torch.bool))) == 0.0
    # a mask that does not describe these tokens' (B, T) positions is not applied, even with as many entries
    torch.testing.assert_close(load_balancing_loss(probs, token_mask=mask[0]), load_balancing_loss(probs))
    torch.testing.assert_close(load_balancing_loss(probs, token_mask=mask.flatten()), load_balancing_loss(probs))


def test_padding_is_left_out_of_gate_statistics_and_aux_loss():
    model = model_with(router_init="kaiming").train()
    ids = tokens(batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # the second sequence: 5 tokens and 4 of right padding
    repadded = ids.clone()
    repadded[1, 5:] = (ids[1, 5:] + 7) % SIZES["vocab_size"]

    def measure(*batches):
        collector, aux = MetricsCollector(model).enable(), RouterAuxLoss(model)
        losses = []
        for batch in batches:
            aux.start(batch.get("attention_mask"))
            model(**batch)
            losses.append(float(aux.stop().detach()))
        aux.close()
        metrics = collector.compute(similarities=False)
        collector.disable()
        return metrics, losses

    masked, (aux_masked,) = measure({"input_ids": ids, "attention_mask": mask})
    assert masked["rlora/router_entropy"] < 0.999  # a kaiming router: not uniform, so padding would show
    # the same statistics as the real tokens alone, run one sequence at a time without padding
    alone, _ = measure({"input_ids": ids[:1]}, {"input_ids": ids[1:, :5]})
    assert masked == pytest.approx(alone, rel=1e-5, abs=1e-6)
    # other padding tokens change nothing under the mask, and everything without it
    other, (aux_other,) = measure({"input_ids": repadded, "attention_mask": mask})
    assert other == pytest.approx(masked, rel=1e-5, abs=1e-6) and aux_other == pytest.approx(aux_masked, rel=1e-5)
    unmasked, (aux_unmasked,) = measure({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    unmasked_other, (aux_unmasked_other,) = measure({"input_ids": repadded, "attention_mask": torch.ones_like(ids)})
    assert unmasked["rlora/router_entropy"] != pytest.approx(unmasked_other["rlora/router_entropy"], rel=1e-5)
    assert aux_unmasked != pytest.approx(aux_unmasked_other, rel=1e-5)
    assert not model._forward_pre_hooks and all(layer.gate_observers == [] for layer in adapted_layers(model))
