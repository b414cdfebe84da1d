"""Generation with an R-LoRA adapter is correct, not only fast: the adapter changes the tokens, left padding, and
eval outputs that follow the weights however they change (optimizer steps, `.data` writes, loaded and deleted
adapters, dtype round trips, inference mode), bit for bit equal to the training path's. The KV cache, eval
determinism and a bf16 base are tested in test_peft_workflow.py and test_peft_layer.py, which also run on
LLaMA-Factory's pins."""

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tiny_models import MLP, PAD, adapted_layers, greedy, perturb, tiny_llama, tokens

from rlora_plugin import RLoraConfig


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
