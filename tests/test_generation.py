"""Generation with an R-LoRA adapter is correct, not only fast: the KV cache, left padding, determinism, a bf16
base, and eval outputs that follow the weights however they change (optimizer steps, `.data` writes, loaded and
deleted adapters, dtype round trips, inference mode), bit for bit equal to the training path's."""

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import MLP, adapted_layers, perturb, tiny_llama, tokens

from rlora_plugin import RLoraConfig

PAD = 0


def rlora_model(seed: int = 3, **overrides) -> PeftModel:
    """A tiny Llama with an R-LoRA adapter whose weights moved away from init (so it differs from the base)."""
    config = dict(r=4, num_heads=3, target_modules=MLP, router_init="kaiming", init_seed=seed)
    model = get_peft_model(tiny_llama(), RLoraConfig(**(config | overrides)))
    perturb(model, seed=seed)
    return model.eval()


def greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model.generate(
        input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None, **kwargs
    )
    return out[:, ids.shape[1] :]


def logits(model, ids: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Eval logits; with `grad`, with autograd recording (the training path's arithmetic)."""
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids).logits.detach()


def test_adapter_changes_generation():
    model, ids = rlora_model(), tokens(batch=2)
    with model.disable_adapter():
        base = logits(model, ids)
    assert (logits(model, ids) - base).abs().max() > 1e-2


def test_kv_cache_decoding_equals_full_recompute():
    model, ids = rlora_model(), tokens(batch=2, length=6)
    cached = model.generate(
        input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    full = model.generate(
        input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None,
        output_scores=True, return_dict_in_generate=True, use_cache=False,
    )  # fmt: skip
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(full.scores), rtol=1e-4, atol=1e-5)
    with model.disable_adapter():
        assert not torch.equal(greedy(model, ids), cached.sequences[:, ids.shape[1] :])


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


def test_eval_outputs_are_deterministic_with_dropout_configured():
    model, ids = rlora_model(lora_dropout=0.3), tokens()
    first = logits(model, ids)
    assert torch.equal(first, logits(model, ids))
    assert torch.equal(greedy(model, ids), greedy(model, ids))


def test_bf16_base_with_fp32_adapter_generates_like_an_fp32_reference():
    config = RLoraConfig(r=4, num_heads=3, target_modules=MLP, router_init="kaiming", init_seed=3)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), config)  # PEFT keeps the adapter in fp32
    perturb(model)
    model.eval()
    layer = adapted_layers(model)[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.rlora_B["default"].dtype == torch.float32
    ids = tokens(batch=2)
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with model.disable_adapter():
        assert not torch.equal(out, logits(model, ids))
    # The same weights in fp32: bf16 rounding of the base moves the logits far less than the adapter does.
    reference = rlora_model()
    expected = logits(reference, ids)
    with reference.disable_adapter():
        adapter_effect = (expected - logits(reference, ids)).abs().max()
    assert (out.float() - expected).abs().max() < 0.1 * adapter_effect
    assert torch.equal(greedy(model, ids), greedy(reference, ids))


@pytest.mark.parametrize(("alpha", "use_rslora"), [(16, False), (12, True)])  # s = 4 or 6
def test_eval_outputs_equal_the_training_path_bits(alpha, use_rslora):
    model, ids = rlora_model(lora_alpha=alpha, use_rslora=use_rslora), tokens()
    evaluated = logits(model, ids)
    assert torch.equal(evaluated, logits(model, ids, grad=True))
    assert torch.equal(evaluated, logits(model, ids))


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
    assert torch.equal(after, logits(model, ids, grad=True))


def test_eval_follows_weights_written_through_data():
    """DeepSpeed ZeRO-1/2 and PEFT's hotswap write weights in through `.data`, which bumps no version counter."""
    model, ids = rlora_model(), tokens()
    before = logits(model, ids)
    with torch.no_grad():
        adapted_layers(model)[0].rlora_B["default"].data.add_(0.5)
    after = logits(model, ids)
    assert not torch.equal(after, before)
    assert torch.equal(after, logits(model, ids, grad=True))


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
    assert torch.equal(logits(model, ids), logits(model, ids, grad=True))


def test_eval_follows_dtype_round_trips():
    model, ids = rlora_model(), tokens()
    logits(model, ids)
    model.to(torch.bfloat16).to(torch.float32)  # rounds every weight: new storages, the same version counters
    assert torch.equal(logits(model, ids), logits(model, ids, grad=True))


def test_inference_mode_and_weights_made_under_it():
    model, ids = rlora_model(), tokens()
    with torch.inference_mode():
        inferred = model(input_ids=ids).logits
    assert torch.equal(inferred, logits(model, ids))
    with torch.inference_mode():  # inference tensors as weights
        made_there = rlora_model()
        assert torch.equal(made_there(input_ids=ids).logits, inferred)
