"""An LLaMA-Factory config with `finetuning_type: rlora`, checked and rewritten to LLaMA-Factory's LoRA path.

`translate` is a pure function: config in, the rewritten config and the run's R-LoRA settings out. Why a
rewrite: LLaMA-Factory branches on `finetuning_type == "lora"` in about fifteen places (adapter loading and
resuming, DPO's reference model as the adapter switched off, DDP's `find_unused_parameters`, `label_names`,
...), and an R-LoRA adapter wants every one of them; only the places where R-LoRA differs are patched
(`patches.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rlora_plugin.config import Source, fields_from
from rlora_plugin.host import Host, absolute_base
from rlora_plugin.layer import MERGE_WHY
from rlora_plugin.registration import PEFT_TYPE_NAME
from rlora_plugin.saved import saved_peft_type

FINETUNING_TYPE = "rlora"
METRICS_KEY = "rlora_metrics"  # the launcher's own switch for the router metrics callback

HOST = Host(
    name="LLaMA-Factory",
    selector=f"finetuning_type: {FINETUNING_TYPE}",
    plain_lora="finetuning_type: lora",
    # LLaMA-Factory's own keys for the plain-LoRA fields, with its meaning and default (no `exclude_modules`,
    # `layers_to_transform`, `layers_pattern`: those keep RLoraConfig's defaults).
    lora_keys={
        "r": "lora_rank",
        "lora_alpha": "lora_alpha",
        "lora_dropout": "lora_dropout",
        "use_rslora": "use_rslora",
        "target_modules": "lora_target",
        "modules_to_save": "additional_target",
    },
    rlora_prefix="rlora_",
    adapter_key="adapter_name_or_path",
    merge_fix=(
        "export it with frozen gates as a plain LoRA that merges exactly (`python -m rlora_plugin.export "
        "ADAPTER_DIR OUT_DIR --gates uniform`), then run `llamafactory-cli export` on OUT_DIR with "
        "`finetuning_type: lora`; or serve the R-LoRA adapter unmerged with `python -m rlora_plugin.llamafactory "
        "chat|api CONFIG.yaml`"
    ),
    refused={
        "use_dora": "dora",
        "pissa_init": "pissa",
        "pissa_convert": "pissa_convert",
        "loraplus_lr_ratio": "loraplus",
        "create_new_adapter": "merge_loaded",
        "use_unsloth": "unsloth",
        "use_kt": "ktransformers",
    },
)
# The stages whose trainer drops the loss the model returns, and so the load-balancing loss that
# `RLoraModel.forward` adds to it (`sft` and `pt` keep the model's loss; `dpo` and `kto` get it from patch 4 of
# patches.py): stage -> why.
AUX_LOSS_REFUSED_STAGES = {
    "rm": "LLaMA-Factory's reward-model trainer (`PairwiseTrainer.compute_loss`) keeps only the value head's scores "
    "and drops the model's own loss, which carries the load-balancing loss",
    "ppo": "LLaMA-Factory's PPO trainer computes its loss in TRL's `PPOTrainer.step` from the logits and values, "
    "never from the model's own loss, which carries the load-balancing loss",
}
# The LoRA fields checked when the config is read; `lora_target` and `additional_target` are resolved by
# LLaMA-Factory at model load, and reach `RLoraConfig` there (patches.py).
_SCALAR_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora")


@dataclass(frozen=True)
class RLoraRun:
    """The R-LoRA settings of an `rlora` config: `RLoraConfig` field -> value (the LoRA fields come from
    LLaMA-Factory's own arguments at model load), and whether the router metrics are logged."""

    options: dict[str, Any] = field(default_factory=dict)
    metrics: bool = True


def _default(key: str) -> Any:
    """LLaMA-Factory's own default of one of its config keys (no defaults retyped here)."""
    from llamafactory.hparams import FinetuningArguments, TrainingArguments

    for cls in (FinetuningArguments, TrainingArguments):
        if key in cls.__dataclass_fields__:
            return cls.__dataclass_fields__[key].default
    raise KeyError(key)


def translate(config: dict[str, Any]) -> tuple[dict[str, Any], RLoraRun | None]:
    """Check an `rlora` config and return it as LLaMA-Factory's LoRA config without the `rlora_*` keys, with
    its R-LoRA settings; any other config comes back unchanged, with None. Raises `HostConfigError`."""
    rlora_keys = sorted(k for k in config if k.startswith("rlora_"))
    if config.get("finetuning_type") != FINETUNING_TYPE:
        if rlora_keys:
            finetuning_type = config.get("finetuning_type", _default("finetuning_type"))
            raise HOST.error(
                rlora_keys[0],
                config[rlora_keys[0]],
                f"is an R-LoRA setting, but `finetuning_type` is {finetuning_type!r}",
                f"set `finetuning_type: {FINETUNING_TYPE}`, or remove the `rlora_*` keys",
            )
        return config, None
    HOST.refuse_unknown_keys({key: config[key] for key in rlora_keys}, [METRICS_KEY])
    HOST.refuse_plain_lora_features(config)
    metrics = config.get(METRICS_KEY, True)
    if not isinstance(metrics, bool):
        raise HOST.error(METRICS_KEY, metrics, "is invalid", "use true or false")
    options = {name: config[key] for key, name in HOST.rlora_keys().items() if key in config}
    lora = {name: config.get(HOST.key(name)) for name in _SCALAR_LORA_FIELDS}
    checked = HOST.build_config({**lora, **options}, run_seed=config.get("seed", _default("seed")))
    for name in fields_from(Source.RUN_SEED):  # the run's seed, resolved now
        options.setdefault(name, getattr(checked, name))
    checkpointing = {}
    if checked.router_aux_loss_coef > 0:
        refuse_aux_loss_stage(config)
        checkpointing = aux_loss_checkpointing(config)
    rewritten = {**{k: v for k, v in config.items() if k not in rlora_keys}, "finetuning_type": "lora", **checkpointing}
    if base := absolute_base(config.get("model_name_or_path")):
        rewritten["model_name_or_path"] = base
    return rewritten, RLoraRun(options, metrics)


def refuse_aux_loss_stage(config: dict[str, Any]) -> None:
    """With `rlora_router_aux_loss_coef` > 0, refuse a stage that would train without the load-balancing loss:
    the router would silently stay unbalanced."""
    stage = config.get("stage", _default("stage"))
    if stage in AUX_LOSS_REFUSED_STAGES:
        key = HOST.key("router_aux_loss_coef")
        raise HOST.error(
            key,
            config[key],
            f"is not supported with `stage: {stage}`: {AUX_LOSS_REFUSED_STAGES[stage]}, so the router would not be "
            "balanced",
            f"remove `{key}` (or set it to 0) for this stage; stages sft, pt, dpo and kto add the loss",
        )


def aux_loss_checkpointing(config: dict[str, Any]) -> dict[str, Any]:
    """The load-balancing loss is computed inside the checkpointed decoder layers, and LLaMA-Factory checkpoints
    them reentrantly by default (`use_reentrant_gc: true`), which runs them without gradients: the loss would
    silently not train the router. Non-reentrant checkpointing instead (with a warning), unless the user chose."""
    if config.get("disable_gradient_checkpointing"):
        return {}
    why = (
        "with `rlora_router_aux_loss_coef` > 0 it runs the router without gradients, so the load-balancing loss "
        "would silently not train it"
    )
    for key in ("use_reentrant_gc", "use_unsloth_gc"):  # Unsloth's checkpoint is reentrant too
        if config.get(key):
            raise HOST.error(
                key, config[key], f"is not supported: {why}", f"remove `{key}`, or set `rlora_router_aux_loss_coef: 0`"
            )
    if "use_reentrant_gc" in config:
        return {}
    logging.getLogger("llamafactory.rlora_plugin").warning(
        "R-LoRA: `use_reentrant_gc` set to false: the load-balancing loss (rlora_router_aux_loss_coef) needs "
        "non-reentrant gradient checkpointing (LLaMA-Factory's default is reentrant)."
    )
    return {"use_reentrant_gc": False}


def hub_options(source: Any) -> dict[str, Any]:
    """The model-hub options LLaMA-Factory loads adapters with, from its `ModelArguments` or its config dict."""
    get = source.get if isinstance(source, dict) else lambda key, default=None: getattr(source, key, default)
    return {"cache_dir": get("cache_dir"), "revision": get("model_revision", "main"), "token": get("hf_hub_token")}


def rlora_adapters(paths: Any, subfolder: str | None = None, **hub: Any) -> list[str]:
    """The R-LoRA adapters in `adapter_name_or_path` (a comma-separated string in the YAML, a list once parsed),
    local directories or model-hub ids (their adapter_config.json decides, not the run's `finetuning_type`);
    more than one adapter with an R-LoRA one among them is refused (LLaMA-Factory merges all but the last)."""
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",")]
    paths = list(paths or [])
    rlora = [p for p in paths if saved_peft_type(p, subfolder, **hub) == PEFT_TYPE_NAME]
    if rlora and len(paths) > 1:
        raise HOST.error(
            HOST.adapter_key,
            ",".join(paths),
            f"stacks adapters, and LLaMA-Factory merges all but the last one; {MERGE_WHY} ({rlora[0]})",
            "give the R-LoRA adapter alone",
        )
    return rlora
