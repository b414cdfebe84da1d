"""Couplings to a host's private state that need no Axolotl (docs/compatibility.md): bitsandbytes' CPU kernel
switch on a wrapped layer, and the metrics callback's writes into TRL's `_metrics` and transformers'
`log_history`. Each must fail loudly, naming the host and what to do, when the host has changed."""

from __future__ import annotations

from collections import defaultdict
from importlib.metadata import version
from types import SimpleNamespace

import pytest
from peft import get_peft_model
from tiny_models import MLP, model_with, tiny_llama, tokens

from rlora_plugin import RLoraConfig
from rlora_plugin.callbacks import RLoraMetricsCallback
from rlora_plugin.patching import HostChanged


def test_unload_gives_the_base_layer_its_bitsandbytes_setting_back():
    model = tiny_llama()
    first, second = model.model.layers[0].mlp.down_proj, model.model.layers[1].mlp.down_proj
    first.support_avx512bf16_for_cpu = True  # what bitsandbytes' Linear4bit sets on an AVX512-BF16 CPU
    second.support_avx512bf16_for_cpu = False
    peft_model = get_peft_model(model, RLoraConfig(target_modules=MLP, r=4, num_heads=3))
    assert not first.support_avx512bf16_for_cpu and not second.support_avx512bf16_for_cpu  # wrapped: no packing
    base = peft_model.unload()
    assert base.model.layers[0].mlp.down_proj is first
    assert first.support_avx512bf16_for_cpu and not second.support_avx512bf16_for_cpu
    assert not hasattr(base.model.layers[0].mlp.up_proj, "support_avx512bf16_for_cpu")  # nothing added


def trl_trainer(model, **attributes):
    """A stand-in for one of TRL's trainers (by module, as the callback recognizes them)."""
    cls = type("DPOTrainer", (), {"__module__": "trl.trainer.dpo_trainer"})
    trainer = cls()
    trainer.model = model
    trainer.__dict__.update(attributes)
    return trainer


def logged_step(callback: RLoraMetricsCallback, model) -> None:
    model.train()
    callback.on_train_begin(None, None, None, model=model)
    model(input_ids=tokens())
    callback.on_step_end(None, None, SimpleNamespace(should_log=True))


def test_metrics_go_into_trls_metric_lists():
    model = model_with(router_init="kaiming")
    trainer = trl_trainer(model, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    logged_step(RLoraMetricsCallback(trainer, metrics=True), model)
    train = trainer._metrics["train"]
    assert len(train["rlora/router_entropy"]) == 1 and 0 < train["rlora/router_entropy"][0] < 1
    assert trainer._metrics["eval"] == {}


@pytest.mark.parametrize(
    "attributes, found",
    [
        ({}, "it is missing"),
        ({"_metrics": [1.0]}, "it is a list"),
        ({"_metrics": {"train": None}}, "_metrics['train']"),
    ],
)
def test_a_trl_trainer_without_its_metric_lists_is_refused_before_training(attributes, found):
    with pytest.raises(HostChanged) as error:
        RLoraMetricsCallback(trl_trainer(model_with(), **attributes), metrics=True)
    message = str(error.value)
    assert f"trl {version('trl')} does not provide" in message and "_metrics" in message and found in message
    assert "checked with trl 1.9.0 and 1.14.1" in message and "`rlora: {metrics: false}`" in message


def test_metrics_join_the_train_record_in_log_history():
    """A plain HF trainer (LLaMA-Factory's: no trainer given): the values join the record Trainer.log appended."""
    model = model_with(router_init="kaiming")
    callback = RLoraMetricsCallback(None, metrics=True)
    logged_step(callback, model)
    logs = {"loss": 2.5}
    state = SimpleNamespace(global_step=3, log_history=[{"loss": 2.5, "step": 3}])
    callback.on_log(None, state, None, logs=logs)
    assert "rlora/router_entropy" in logs and state.log_history[-1] == {**logs, "step": 3}


def test_a_trainer_that_did_not_append_the_record_is_an_error():
    model = model_with()
    callback = RLoraMetricsCallback(None, metrics=True)
    logged_step(callback, model)
    state = SimpleNamespace(global_step=3, log_history=[{"loss": 2.0, "step": 2}])  # the previous record only
    with pytest.raises(HostChanged) as error:
        callback.on_log(None, state, None, logs={"loss": 2.5})
    message = str(error.value)
    assert f"transformers {version('transformers')} does not provide" in message and "log_history" in message
    assert "`rlora_metrics: false`" in message
    assert state.log_history == [{"loss": 2.0, "step": 2}]  # nothing written into a record of another step


def test_a_real_trainer_logs_the_metrics_into_its_history(tmp_path):
    """What the two checks above stand for, on the installed transformers: `Trainer.log` appends the train record
    before `on_log`, and the callback's values reach `log_history`."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = model_with(router_init="kaiming")
    ids = tokens(batch=4).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        str(tmp_path), max_steps=2, logging_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RLoraMetricsCallback(None, metrics=True)])
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 < r["rlora/router_entropy"] < 1 for r in records), records


def test_a_changed_peft_type_enum_is_refused_before_it_is_touched(monkeypatch):
    """`import rlora_plugin` extends PEFT's closed `PeftType` enum through its private tables."""
    from peft.utils import PeftType

    from rlora_plugin.patching import HostChanged
    from rlora_plugin.registration import add_peft_type_member

    monkeypatch.setattr(PeftType, "_value2member_map_", None)
    with pytest.raises(HostChanged, match=r"PeftType\._value2member_map_` as a dict \(it is a NoneType\)"):
        add_peft_type_member("RLORA_CHANGED")
    assert "RLORA_CHANGED" not in PeftType._member_names_ and "RLORA_CHANGED" not in PeftType.__members__
