"""The load-balancing loss (`router_aux_loss_coef`) inside the tuner: real HF Trainer steps through PEFT (no Axolotl),
checked against an independent computation and under gradient accumulation on both of the trainer's paths."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import MLP, adapted_layers, tiny_llama, tokens
from transformers import Trainer, TrainingArguments

from rlora_plugin import RLoraConfig

COEF = 0.5
ROWS, LENGTH = 2, 9


def rlora_model(coef: float = COEF, **kwargs) -> torch.nn.Module:
    config = dict(target_modules=MLP, r=4, num_heads=3, lora_dropout=0.0, router_init="kaiming") | kwargs
    return get_peft_model(tiny_llama(), RLoraConfig(task_type="CAUSAL_LM", router_aux_loss_coef=coef, **config))


def micro_batch() -> list[dict[str, torch.Tensor]]:
    """Two rows, the second with 3 tokens of right padding (left out of the loss and of the load balance)."""
    ids = tokens(ROWS, LENGTH)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(ROWS)]


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_step(model, tmp_path, repeats: int, accumulation: int, num_items: bool = True) -> dict[str, torch.Tensor]:
    """One optimizer step of plain SGD with learning rate 1 (the update is minus the gradient) over the micro-batch
    repeated `repeats` times, in micro-batches of `ROWS * repeats / accumulation` rows taken in order. `num_items`
    False: the trainer divides each micro-batch's loss by the accumulation steps instead of passing
    `num_items_in_batch` to the model."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=ROWS * repeats // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=micro_batch() * repeats)
    assert trainer.model_accepts_loss_kwargs  # a Llama's loss takes num_items_in_batch
    trainer.model_accepts_loss_kwargs = num_items
    trainer.train()
    return trainable(model)


def independent_aux_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`mean_layers N * sum_i f_i P_i` over the real tokens, from each adapted layer's input, written out here."""
    inputs = {}
    hooks = [
        layer.register_forward_hook(lambda m, x, y: inputs.__setitem__(m, x[0])) for layer in adapted_layers(model)
    ]
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.base_model.pop_unadded_aux_loss()  # the model's own record of this forward without labels
    for hook in hooks:
        hook.remove()
    real = batch["attention_mask"].bool()
    losses = []
    for layer, x in inputs.items():
        probs = torch.softmax(x @ layer.rlora_router["default"].T, dim=-1)[real]  # (real tokens, N)
        heads = probs.shape[-1]
        routed = torch.nn.functional.one_hot(probs.argmax(-1), heads).float().mean(0)  # f: no gradient
        losses.append(heads * (routed * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def test_trainer_step_adds_coef_times_the_load_balancing_gradient(tmp_path):
    """Through PEFT and the HF Trainer alone: the update with the loss on differs from the one without it by
    exactly `coef *` the gradient of the load-balancing loss, computed here from the layers' inputs. On the path
    without `num_items_in_batch`, where its weight is 1: with it, the weight is the micro-batch's share of the
    trainer's count, which transformers 5.6 (LLaMA-Factory's) takes over `labels`, not `labels[..., 1:]`, so that
    the cross-entropy and this term are both scaled by 13/15 here."""
    initial = trainable(rlora_model())
    with_aux = one_step(rlora_model(), tmp_path, repeats=1, accumulation=1, num_items=False)
    without = one_step(rlora_model(coef=0.0), tmp_path, repeats=1, accumulation=1, num_items=False)

    model = rlora_model().train()
    batch = {key: torch.stack([row[key] for row in micro_batch()]) for key in ("input_ids", "attention_mask")}
    aux = independent_aux_loss(model, batch)
    assert 1.0 < float(aux.detach()) < 3.0  # a kaiming router: between balanced (1) and collapsed (N)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(COEF * aux, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    routers = 0
    for name, grad in zip(names, grads, strict=True):
        expected = torch.zeros_like(initial[name]) if grad is None else -grad  # SGD, learning rate 1
        torch.testing.assert_close(with_aux[name] - without[name], expected, atol=1e-6, rtol=1e-4)
        routers += "rlora_router" in name and grad is not None and bool(grad.abs().max() > 0)
    assert routers == len(adapted_layers(model))  # every router gets a gradient from the loss


@pytest.mark.parametrize("num_items", [True, False], ids=["num_items_in_batch", "divided_by_steps"])
def test_gradient_accumulation_equals_one_batch_k_times_larger(tmp_path, num_items):
    """k micro-batches (the same one, so the load balance of the whole equals each one's) give the update of the
    one batch of k copies, on both of the HF Trainer's paths: with `num_items_in_batch` passed to the model (the loss
    normalized over the accumulated batch, not divided by the trainer) and without (divided by k). A load-balancing
    loss added unweighted to each micro-batch would count k times on the first path."""
    k = 3
    big = one_step(rlora_model(), tmp_path, repeats=k, accumulation=1, num_items=num_items)
    accumulated = one_step(rlora_model(), tmp_path, repeats=k, accumulation=k, num_items=num_items)
    initial = trainable(rlora_model())
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5)
    assert any("rlora_router" in n and (big[n] - initial[n]).abs().max() > 1e-3 for n in big)


def test_micro_batch_weight_is_its_share_of_num_items_in_batch():
    """With `num_items_in_batch`, a micro-batch's load-balancing loss is weighted by its label tokens (as a causal
    LM's loss counts them: `labels[..., 1:]`) over the accumulated batch's count, as its cross-entropy is."""
    model = rlora_model().train()
    rows = micro_batch()
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        summed = model(**batch, num_items_in_batch=1).loss  # the cross-entropy summed over the label tokens
    aux = float(independent_aux_loss(model, batch))
    counted = int((batch["labels"][:, 1:] != -100).sum())
    total = 40  # this micro-batch's 13 label tokens and those of others
    loss = model(**batch, num_items_in_batch=total).loss
    assert float(loss) == pytest.approx((float(summed) + COEF * aux * counted) / total, rel=1e-5)


def test_a_forward_without_labels_leaves_the_loss_to_the_trainer():
    """A trainer that computes its loss from the logits (TRL's DPO) takes the weighted loss with
    `pop_unadded_aux_loss`; one that leaves it is warned at the next training forward."""
    model = rlora_model().train()
    rows = micro_batch()
    batch = {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "attention_mask")}
    expected = COEF * float(independent_aux_loss(model, batch))
    assert model(**batch).loss is None
    unadded = model.base_model.pop_unadded_aux_loss()
    assert unadded.requires_grad and float(unadded) == pytest.approx(expected)
    assert model.base_model.pop_unadded_aux_loss() is None
    model(**batch)
    with pytest.warns(UserWarning, match="nothing added its load-balancing loss"):
        model(**batch)
    model.base_model.pop_unadded_aux_loss()
    model.eval()(**batch)  # neither evaluation nor a training forward without gradients has the loss
    with torch.no_grad():
        model.train()(**batch)
    assert model.base_model.pop_unadded_aux_loss() is None


def test_gradient_checkpointing_non_reentrant_trains_the_router_and_reentrant_warns():
    """Non-reentrant checkpointing recomputes the layers during backward with the same ops and mask: the same
    gradients as without it. A reentrant checkpoint runs them without gradients: a warning, not a silent loss."""
    rows = micro_batch()
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    def gradients(**checkpointing):
        model = rlora_model()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            model.enable_input_require_grads()
        model.train()(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(), gradients(use_reentrant=False)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)
    with pytest.warns(UserWarning, match="no load-balancing loss was recorded"):
        gradients(use_reentrant=True)


def test_a_peft_model_without_task_type_is_refused():
    """A PeftModel without a task type calls the base model directly, never the tuner's forward."""
    with pytest.raises(
        ValueError, match=r"RLoraConfig: `router_aux_loss_coef: 0.5` needs a `task_type`.*Fix: set task_type"
    ):
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, router_aux_loss_coef=0.5))
    get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP))  # off: nothing to add
