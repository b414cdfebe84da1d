"""The `rlora/...` router metrics as a transformers TrainerCallback, shared by the Axolotl plugin and the
LLaMA-Factory launcher (math: rlora_plugin.metrics)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from rlora_plugin.metrics import MetricsCollector
from rlora_plugin.model import find_tuner


class RLoraMetricsCallback(TrainerCallback):
    """Logs the `rlora/...` metrics through the trainer's own logging, every `logging_steps`.

    Gate statistics are summed by the layers during the training forwards that happen anyway (see
    `rlora_plugin.metrics.MetricsCollector`); head similarities are computed from the weights only at
    logging steps. On a step where the trainer is about to log (`control.should_log`, set by the
    DefaultFlowCallback that runs before this one), the values go to the trainer's own metric buffer, which
    its `log()` folds into the record every reporter receives (and `trainer_state.json`'s `log_history`):
    `store_metrics` of `AxolotlTrainer` and TRL's ORPO/CPO trainers, or the `_metrics["train"]` lists that
    TRL's DPO, KTO and GRPO trainers average in their `log()` override. With a plain HF trainer (LLaMA-
    Factory's; `trainer` None, the model is taken at train begin) they are added to the next train record in
    `on_log`: the console, `log_history` and the callbacks after this one see them; the `report_to`
    reporters, which transformers puts before it, do not.

    With `router_aux_loss_coef > 0` it also logs `rlora/aux_loss`, the mean load-balancing loss of the training
    forwards since the last log (recorded by `RLoraModel.forward`, which adds it to the loss).
    """

    def __init__(self, trainer: Any, metrics: bool) -> None:
        self.trainer = trainer
        self.metrics = metrics
        self.model = trainer.model if trainer is not None else None
        self.collector = MetricsCollector(self.model) if metrics and self.model is not None else None
        self._pending: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.model is None:  # no trainer given (LLaMA-Factory): the trainer's model
            self.model = model
        if self.metrics and self.collector is None:
            self.collector = MetricsCollector(model)
        if self.collector is not None:
            self.collector.enable()

    def on_train_end(self, args, state, control, **kwargs):
        if self.collector is not None:
            self.collector.disable()

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_log:
            return
        values = self.collector.compute() if self.collector is not None else {}
        tuner = find_tuner(self.model) if self.model is not None else None
        aux = tuner.router_aux_loss if tuner is not None else None
        if aux is not None and (value := aux.pop_mean()) is not None:
            values["rlora/aux_loss"] = value
        if not values:
            return
        trl_metrics = getattr(self.trainer, "_metrics", None)
        if hasattr(self.trainer, "store_metrics"):
            self.trainer.store_metrics(values, train_eval="train")
        elif isinstance(trl_metrics, dict) and "train" in trl_metrics:
            for key, value in values.items():
                trl_metrics["train"][key].append(value)
        else:  # a plain HF Trainer: add them to the next train record
            self._pending = values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None and "loss" in logs:
            logs.update(self._pending)
            # The trainer appended a copy of `logs` (plus "step") to the history before calling back.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)
            self._pending = {}
