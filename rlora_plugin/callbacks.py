"""The `rlora/...` router metrics as a transformers TrainerCallback, shared by the Axolotl plugin and the
LLaMA-Factory launcher (math: rlora_plugin.metrics)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from transformers import TrainerCallback

from rlora_plugin.metrics import MetricsCollector
from rlora_plugin.model import find_tuner
from rlora_plugin.patching import Checked, HostChanged, private_attribute, qualified_name

TRL = Checked("trl", "1.9.0 and 1.14.1, with Axolotl 0.19.0 and 0.21.0")
TRANSFORMERS = Checked("transformers", "5.6.0, 5.16.1 and 5.20.1")
_FIX = (
    "Turn the R-LoRA metrics off to train without them (Axolotl: `rlora: {metrics: false}`; LLaMA-Factory: "
    "`rlora_metrics: false`), or install one of the checked versions, or report this at rlora-plugin."
)


def trl_train_metrics(trainer: Any) -> MutableMapping | None:
    """The private `_metrics["train"]` lists that TRL's trainers (DPO, KTO, GRPO, ...) average into each train
    record in their `log()` override; None for a trainer that is not TRL's. Checked before anything is written."""
    if not any(cls.__module__.split(".")[0] == "trl" for cls in type(trainer).__mro__):
        return None
    train = private_attribute(trainer, "_metrics", dict, TRL, _FIX).get("train")
    if not isinstance(train, MutableMapping):
        raise HostChanged(TRL, f"`{qualified_name(trainer)}._metrics['train']` as a dict of metric lists", _FIX)
    return train


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
        stores = trainer is not None and hasattr(trainer, "store_metrics")
        self._trl_metrics = None if trainer is None or stores else trl_train_metrics(trainer)
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
        if hasattr(self.trainer, "store_metrics"):
            self.trainer.store_metrics(values, train_eval="train")
        elif self._trl_metrics is not None:
            for key, value in values.items():
                self._trl_metrics.setdefault(key, []).append(value)
        else:  # a plain HF Trainer: add them to the next train record
            self._pending = values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None and "loss" in logs:
            logs.update(self._pending)
            # transformers' Trainer.log appended a copy of `logs` (plus "step") to the history before calling back.
            record = state.log_history[-1] if state.log_history else None
            if not (isinstance(record, dict) and record.get("step") == state.global_step and "loss" in record):
                raise HostChanged(
                    TRANSFORMERS,
                    "`Trainer.log` to append the train record (with its `step`) to `state.log_history` before it "
                    "calls `on_log`",
                    _FIX,
                )
            record.update(self._pending)
            self._pending = {}
