"""Generation with an R-LoRA adapter is correct, not only fast: the adapter changes the tokens, left padding, and
eval outputs that follow the weights however they change (optimizer steps, `.data` writes, loaded and deleted
adapters, dtype round trips, inference mode, writes to the base weight), equal to the training path's up to the
rounding of the offset path folded into the base weight (which the training path adds per token). The fold
itself: its value, the base weight never written, dropped with gradients, skipped where there is nothing to fold.
The KV cache, eval determinism and a bf16 base are tested in test_peft_workflow.py and test_peft_layer.py, which
also run on LLaMA-Factory's pins."""

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import MLP, PAD, adapted_layers, greedy, model_with, perturb, tiny_gpt2, tiny_llama, tokens
from torch.nn import functional as F

from rlora_plugin import RLoraConfig, RLoraLinear


def rlora_model(seed: int = 3, **overrides) -> PeftModel:
    """A tiny Llama with an R-LoRA adapter whose weights moved away from init (so it differs from the base)."""
    config = dict(r=4, num_heads=3, target_modules=MLP, router_init="kaiming", init_seed=seed)
    model = get_peft_model(tiny_llama(), RLoraConfig(**(config | overrides)))
    perturb(model, seed=seed)
    return model.eval()


def logits(model, ids: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Eval logits; with `grad`, with autograd recording (the training path's arithmetic)."""
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids).logits.detach()


def assert_training_path(evaluated: torch.Tensor, model, ids: torch.Tensor) -> None:
    """`evaluated` equals the training path's logits up to fp32 rounding (the folded offset rounds once more);
    a stale weight anywhere moves them by orders of magnitude more."""
    torch.testing.assert_close(evaluated, logits(model, ids, grad=True), atol=1e-5, rtol=1e-5)


def test_adapter_changes_generation():
    """An adapter that is not the identity at init (`init_weights=False`: no offset path) changes the tokens
    `generate` picks, in every row; disabled, the tokens are the base model's."""
    config = RLoraConfig(
        r=4, num_heads=3, lora_alpha=64, target_modules=MLP, router_init="kaiming", init_seed=3, init_weights=False
    )  # alpha 64: a large enough update to move the argmax (at 16 it moves the logits but no token)
    model, ids = get_peft_model(tiny_llama(), config).eval(), tokens(batch=2)
    expected = greedy(tiny_llama(), ids)
    with model.disable_adapter():
        base = logits(model, ids)
        assert torch.equal(greedy(model, ids), expected)
    assert (logits(model, ids) - base).abs().max() > 1e-2
    generated = greedy(model, ids)
    assert all(not torch.equal(ours, theirs) for ours, theirs in zip(generated, expected, strict=True))


def test_left_padded_batch_gives_each_row_its_own_tokens():
    model = rlora_model()
    rows = [tokens(batch=1, length=n, seed=s)[0].clamp(min=1) for n, s in ((9, 5), (4, 6), (6, 7))]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    batched = greedy(model, ids, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = greedy(model, row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long))
        assert torch.equal(batched[i], alone[0]), f"row {i}"


@pytest.mark.parametrize(("alpha", "use_rslora"), [(16, False), (12, True)])  # s = 4 or 6
def test_eval_outputs_equal_the_training_path(alpha, use_rslora):
    model, ids = rlora_model(lora_alpha=alpha, use_rslora=use_rslora), tokens()
    evaluated = logits(model, ids)
    assert_training_path(evaluated, model, ids)
    assert torch.equal(evaluated, logits(model, ids))  # the fold is remade after the training path, bit for bit


def test_eval_follows_optimizer_steps():
    model, ids = rlora_model(), tokens()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train_step() -> None:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()

    train_step()
    before = logits(model, ids)
    greedy(model, ids)
    train_step()
    after = logits(model, ids)
    assert not torch.equal(after, before)
    assert_training_path(after, model, ids)


def test_eval_follows_weights_written_through_data():
    """DeepSpeed ZeRO-1/2 and PEFT's hotswap write weights in through `.data`, which bumps no version counter."""
    model, ids = rlora_model(), tokens()
    before = logits(model, ids)
    with torch.no_grad():
        adapted_layers(model)[0].rlora_B["default"].data.add_(0.5)
    after = logits(model, ids)
    assert not torch.equal(after, before)
    assert_training_path(after, model, ids)


def test_eval_follows_loaded_set_and_deleted_adapters(tmp_path):
    other = rlora_model(seed=11)
    other.save_pretrained(tmp_path / "other")
    expected_other = logits(other, tokens())
    model, ids = rlora_model(), tokens()
    expected_default = logits(model, ids)

    model.load_adapter(tmp_path / "other", adapter_name="other")
    model.set_adapter("other")
    assert torch.equal(logits(model, ids), expected_other)
    model.set_adapter("default")
    assert torch.equal(logits(model, ids), expected_default)

    # New weights written into the active adapter's tensors (in place, as load_state_dict does).
    state = get_peft_model_state_dict(other, adapter_name="default")
    set_peft_model_state_dict(model, state, adapter_name="default")
    assert torch.equal(logits(model, ids), expected_other)

    model.set_adapter("other")
    model.delete_adapter("other")
    assert all("other" not in layer.rlora_A for layer in adapted_layers(model))
    assert torch.equal(logits(model, ids), expected_other)
    assert_training_path(logits(model, ids), model, ids)


def test_eval_follows_dtype_round_trips():
    model, ids = rlora_model(), tokens()
    logits(model, ids)
    model.to(torch.bfloat16).to(torch.float32)  # rounds every weight: new storages, the same version counters
    assert_training_path(logits(model, ids), model, ids)


def test_inference_mode_and_weights_made_under_it():
    model, ids = rlora_model(), tokens()
    with torch.inference_mode():
        inferred = model(input_ids=ids).logits
    assert torch.equal(inferred, logits(model, ids))
    with torch.inference_mode():  # inference tensors as weights
        made_there = rlora_model()
        # Inference tensors keep no version counter to watch: these layers add the offset per token (no fold).
        torch.testing.assert_close(made_there(input_ids=ids).logits, inferred, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- the offset path folded at inference
def expected(layer: RLoraLinear, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """`W0 x + s * sum_i g_i B_i A x - s * Bbar0 A0 x`, one head at a time, from the layer's tensors as they are."""
    n, r = layer.num_heads[adapter], layer.r[adapter]
    a, b = layer.rlora_A[adapter].detach(), layer.rlora_B[adapter].detach()
    gates = torch.softmax(x @ layer.rlora_router[adapter].detach().T, dim=-1)
    s = layer.scaling[adapter]
    out = x @ layer.base_layer.weight.detach().T
    for i in range(n):
        out = out + s * gates[..., i : i + 1] * ((x @ a.T) @ b[:, i * r : (i + 1) * r].T)
    return out - s * (x @ layer.rlora_offset_A[adapter].T) @ layer.rlora_offset_B[adapter].T


def trained_layer():
    """A tiny R-LoRA model (random init: with its offset path) whose adapter weights moved as in training."""
    model = model_with()
    perturb(model)
    return model, adapted_layers(model)[0], torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))


def test_no_grad_forward_uses_the_folded_weight_and_leaves_the_base_weight_alone():
    model, layer, x = trained_layer()
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected(layer, x), atol=1e-5, rtol=1e-5)
    s = layer.scaling["default"]
    folded = weight - s * layer.rlora_offset_B["default"] @ layer.rlora_offset_A["default"]
    torch.testing.assert_close(layer.folded_base_weight(["default"]), folded, atol=1e-6, rtol=1e-6)
    assert torch.equal(layer.base_layer.weight, weight)  # never written: nothing to undo
    with torch.enable_grad():
        layer(x)
    assert layer._folded is None  # a forward with gradients drops the copy (and its memory)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), got, atol=0, rtol=0)  # remade the same


def load_state_dict(model, layer, x):
    """Every adapter tensor, the frozen offset path's included, replaced through PEFT's loader."""
    state = {key: value * 1.5 + 0.01 for key, value in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, state)


def base_write(model, layer, x):
    with torch.no_grad():
        layer.base_layer.weight.mul_(0.5)


@pytest.mark.parametrize("write", [load_state_dict, base_write])
def test_fold_follows_the_offset_path_and_the_base_weight(write):
    """Between two forwards without gradients, a write to the saved tensors (PEFT's loader, offset path included)
    or in place to the base weight remakes the fold."""
    model, layer, x = trained_layer()
    with torch.no_grad():
        before = layer(x)
    write(model, layer, x)
    with torch.no_grad():
        got = layer(x)
    assert not torch.allclose(got, before)
    torch.testing.assert_close(got, expected(layer, x), atol=1e-5, rtol=1e-5)


def test_dtype_change_remakes_the_fold():
    model, layer, x = trained_layer()
    with torch.no_grad():
        layer(x)
        model.double()
        got = layer(x.double())
    assert got.dtype == torch.float64
    assert layer.folded_base_weight(["default"]).dtype == torch.float64
    torch.testing.assert_close(got, expected(layer, x.double()))


def test_adapter_switch_and_disable_with_the_fold():
    """Two adapters: each answers as itself in turn, and with adapters disabled the base weight answers."""
    model, layer, x = trained_layer()
    model.add_adapter("other", RLoraConfig(target_modules=MLP, r=4, num_heads=3, lora_dropout=0.0, init_seed=5))
    perturb(model)
    with torch.no_grad():
        for adapter in ("other", "default", "other"):
            model.set_adapter(adapter)
            torch.testing.assert_close(layer(x), expected(layer, x, adapter), atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            assert torch.equal(layer(x), F.linear(x, layer.base_layer.weight))


def test_greedy_decode_with_and_without_the_fold(monkeypatch):
    model, _, _ = trained_layer()
    model.eval()
    folded = greedy(model, tokens(), max_new_tokens=6)
    monkeypatch.setattr(RLoraLinear, "fold_offset", False)
    unfolded = greedy(model, tokens(), max_new_tokens=6)
    assert all(layer._folded is None for layer in adapted_layers(model))
    assert torch.equal(folded, unfolded)


@pytest.mark.parametrize("case", ["conv1d", "zero-init"])
def test_no_fold_where_there_is_nothing_to_fold(case):
    """GPT-2's Conv1D keeps its offset path per token; `init: zero` has none: neither makes a copy."""
    if case == "conv1d":
        model = get_peft_model(tiny_gpt2(), RLoraConfig(target_modules=["c_fc"], r=4, num_heads=3, lora_dropout=0.0))
    else:
        model = get_peft_model(
            tiny_llama(), RLoraConfig(target_modules=MLP, r=4, num_heads=3, init="zero", lora_dropout=0.0)
        )
    perturb(model)
    layer = adapted_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
    assert layer._folded[2] is None
    with torch.enable_grad():
        torch.testing.assert_close(got, layer(x).detach())
