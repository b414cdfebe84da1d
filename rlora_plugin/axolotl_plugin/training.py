"""Trainer-side wiring of the load-balancing loss (math: rlora_plugin.metrics; the metrics callback:
rlora_plugin.callbacks)."""

from __future__ import annotations

from typing import Any

from rlora_plugin.metrics import RouterAuxLoss

from . import LOG


def install_aux_loss(trainer: Any, coef: float) -> RouterAuxLoss:
    """Wrap `trainer.compute_loss` so that training losses include `coef * ` the routers' load-balancing
    loss (mean over layers), scaled like the trainer scales the main loss under gradient accumulation."""
    aux = RouterAuxLoss(trainer.model)
    original = trainer.compute_loss
    warned = []

    def compute_loss(model, inputs, *args, **kwargs):
        if not model.training:
            return original(model, inputs, *args, **kwargs)
        aux.start()
        try:
            out = original(model, inputs, *args, **kwargs)
        finally:
            value = aux.stop()
        if value is None:
            if not warned:
                warned.append(True)
                LOG.warning(
                    "R-LoRA: rlora.router_aux_loss_coef is set, but no load-balancing loss was recorded in a "
                    "training forward with gradients (a reentrant gradient checkpoint?): the router is not "
                    "balanced. Use `gradient_checkpointing_kwargs: {use_reentrant: false}`."
                )
            return out
        loss = out[0] if isinstance(out, tuple) else out
        items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
        # HF Trainer divides the loss by the accumulation steps unless compute_loss already normalized it
        # over the whole accumulated batch (model_accepts_loss_kwargs with num_items_in_batch).
        prenormalized = (getattr(trainer, "model_accepts_loss_kwargs", False) and items is not None) or getattr(
            trainer, "compute_loss_func", None
        ) is not None
        steps = getattr(trainer, "current_gradient_accumulation_steps", None)
        steps = steps or trainer.args.gradient_accumulation_steps
        loss = loss + (coef / (steps if prenormalized else 1)) * value.to(loss.device, loss.dtype)
        return (loss, *out[1:]) if isinstance(out, tuple) else loss

    trainer.compute_loss = compute_loss
    return aux
