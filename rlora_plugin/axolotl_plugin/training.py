"""Trainer-side wiring of the router metrics and the load-balancing loss (math: rlora_plugin.metrics)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from rlora_plugin.metrics import MetricsCollector, RouterAuxLoss

from . import LOG


class RLoraMetricsCallback(TrainerCallback):
    """Logs the `rlora/...` metrics through the trainer's own logging, every `logging_steps`.

    Gate statistics are summed by the layers during the training forwards that happen anyway (see
    `rlora_plugin.metrics.MetricsCollector`); head similarities are computed from the weights only at
    logging steps. On a step where the trainer is about to log (`control.should_log`, set by the
    DefaultFlowCallback that runs before this one), the values go to the trainer's own metric buffer, which
    its `log()` folds into the record every reporter receives (and `trainer_state.json`'s `log_history`):
    `store_metrics` of `AxolotlTrainer` and TRL's ORPO/CPO trainers, or the `_metrics["train"]` lists that
    TRL's DPO, KTO and GRPO trainers average in their `log()` override.
    """

    def __init__(self, trainer: Any, metrics: bool, aux: RouterAuxLoss | None = None) -> None:
        self.trainer = trainer
        self.collector = MetricsCollector(trainer.model) if metrics else None
        self.aux = aux
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.collector is not None:
            self.collector.enable()

    def on_train_end(self, args, state, control, **kwargs):
        if self.collector is not None:
            self.collector.disable()
        if self.aux is not None:
            self.aux.close()  # takes the observers and the token-mask hook off the model

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_log:
            return
        values = self.collector.compute() if self.collector is not None else {}
        if self.aux is not None and (aux := self.aux.pop_mean()) is not None:
            values["rlora/aux_loss"] = aux
        if not values:
            return
        trl_metrics = getattr(self.trainer, "_metrics", None)
        if hasattr(self.trainer, "store_metrics"):
            self.trainer.store_metrics(values, train_eval="train")
        elif isinstance(trl_metrics, dict) and "train" in trl_metrics:
            for key, value in values.items():
                trl_metrics["train"][key].append(value)
        else:  # a plain HF Trainer: add them to the next train record the callbacks see
            self._pending = values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None and "loss" in logs:
            logs.update(self._pending)
            self._pending = {}


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
