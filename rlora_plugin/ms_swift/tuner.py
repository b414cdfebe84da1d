"""`--tuner_type rlora` in ms-swift 4.6, on ms-swift's own extension points: `swift.tuner_plugin.tuners_map` (the
tuner that sft, rlhf, resume and `--adapters` loading look up) and `swift.callbacks.callbacks_map`.

ms-swift's LoRA arguments keep their meaning and defaults (`--lora_rank` -> r, `--lora_alpha`, `--lora_dropout`,
`--use_rslora`, `--target_modules` / `--target_regex` expanded by ms-swift itself, `--modules_to_save`, `--seed` ->
init_seed). R-LoRA's own options are `rlora_<field>` keys of `--model_kwargs`, ms-swift's way to pass what it has
no argument for: it exports them as `RLORA_<FIELD>` environment variables, so those work too. The saved adapter is
a plain PEFT adapter (peft_type RLORA), as every host writes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from peft import PeftModel, get_peft_model
from swift.callbacks import callbacks_map
from swift.tuner_plugin import PeftTuner, tuners_map
from swift.utils import get_logger, json_parse_to_dict

from rlora_plugin.callbacks import RLoraMetricsCallback
from rlora_plugin.config import RLoraConfig
from rlora_plugin.host import Host, absolute_base, adopt_saved_config

TUNER_TYPE = "rlora"
METRICS_CALLBACK = "rlora_metrics"
ENV_PREFIX = "RLORA_"
logger = get_logger()

HOST = Host(
    name="ms-swift",
    selector=f"--tuner_type {TUNER_TYPE}",
    plain_lora="--tuner_type lora",
    lora_keys={
        "r": "lora_rank",
        "lora_alpha": "lora_alpha",
        "lora_dropout": "lora_dropout",
        "use_rslora": "use_rslora",
        "target_modules": "target_modules",
        "modules_to_save": "modules_to_save",
    },
    rlora_prefix="rlora_",  # a key of --model_kwargs; its environment variable is the upper case
    adapter_key="adapters",
    merge_fix=(
        "serve it unmerged (`swift infer --adapters CKPT`), or export it with frozen gates as a plain LoRA "
        "(`python -m rlora_plugin.export CKPT OUT --gates uniform`) and merge that with `swift export --model BASE "
        "--adapters OUT --merge_lora true`"
    ),
    refused={
        "use_dora": "dora",
        "lorap_lr_ratio": "loraplus",
        "target_parameters": "target_parameters",
        "init_weights": "lora_init",
        "tuner_backend": "unsloth",
        "merge_lora": "merge",
    },
)
# ms-swift arguments with which its sft trainer computes the loss from the logits and drops the model's own loss,
# which carries the load-balancing loss (trainers/seq2seq_trainer.py `compute_loss`): name -> the value that is off.
LOSS_FROM_LOGITS = {
    "loss_type": None,
    "loss_scale": "default",
    "enable_dft_loss": False,
    "enable_channel_loss": False,
    "sequence_parallel_size": 1,
}
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def rlora_options(model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """R-LoRA's own settings of the run: `RLoraConfig` field -> value, from the `RLORA_*` environment and from
    `model_kwargs` (which ms-swift has not exported yet when the arguments are checked). An environment value is a
    string (ms-swift writes `str(v)`): JSON where it parses ("4", "0.01", "true", "null"), else the string."""
    raw = {name.lower(): _decode(text) for name, text in os.environ.items() if name.startswith(ENV_PREFIX)}
    raw |= {key.lower(): value for key, value in (model_kwargs or {}).items() if key.upper().startswith(ENV_PREFIX)}
    HOST.refuse_unknown_keys(raw)
    known = HOST.rlora_keys()
    return {known[key]: value for key, value in raw.items()}


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text == "None" else text


def refuse_unsupported(args: Any, options: dict[str, Any]) -> None:
    """ms-swift arguments that R-LoRA cannot honour, refused by name, the key and the fix in the message."""
    init = args.init_weights
    HOST.refuse_plain_lora_features(
        {
            "use_dora": args.use_dora,
            "lorap_lr_ratio": args.lorap_lr_ratio,
            "target_parameters": args.target_parameters,
            "init_weights": init if isinstance(init, str) and init.lower() not in ("true", "false") else None,
            "tuner_backend": args.tuner_backend if args.tuner_backend == "unsloth" else None,
        }
    )
    if args.lora_bias != "none":
        raise HOST.error("lora_bias", args.lora_bias, "is not supported: R-LoRA trains no biases", "remove it")
    if args.lora_dtype is not None:
        raise HOST.error(
            "lora_dtype",
            args.lora_dtype,
            "is not supported: R-LoRA keeps its adapter weights in float32 (PEFT's autocast) whatever the base's dtype",
            "remove it",
        )
    if _task_type(args) not in TASK_TYPES:
        raise HOST.error(
            "task_type", args.task_type, "is not supported with R-LoRA", f"use one of {', '.join(TASK_TYPES)}"
        )
    refuse_lost_aux_loss(args, options)


def _task_type(args: Any) -> str:
    return str(args.task_type or "causal_lm").lower()  # None until ms-swift resolves it from the model: causal_lm


def refuse_lost_aux_loss(args: Any, options: dict[str, Any]) -> None:
    """With the load-balancing loss on (`options`: the run's R-LoRA settings), refuse a run that would train without
    it: the router would silently stay unbalanced. The model adds it to its own loss; these runs drop that loss or
    record none."""
    coef = options.get("router_aux_loss_coef")
    if not coef:
        return
    key = HOST.key("router_aux_loss_coef")
    if hasattr(args, "rlhf_type"):
        raise HOST.error(
            key,
            coef,
            f"is not supported with `swift rlhf --rlhf_type {args.rlhf_type}`: ms-swift's preference trainers compute "
            "their loss from the logits and drop the model's own loss, which carries the load-balancing loss",
            f"remove `{key}` from --model_kwargs for this run",
        )
    for name, off in LOSS_FROM_LOGITS.items():
        if getattr(args, name) != off:
            raise HOST.error(
                key,
                coef,
                f"is not supported with `--{name} {getattr(args, name)}`: ms-swift then computes the loss from the "
                "logits and drops the model's own loss, which carries the load-balancing loss",
                f"remove `--{name}`, or `{key}` from --model_kwargs",
            )
    if args.gradient_checkpointing:
        kwargs = json_parse_to_dict(args.gradient_checkpointing_kwargs) or {}
        if kwargs.get("use_reentrant") is not False:  # ms-swift's default on one process is reentrant
            raise HOST.error(
                key,
                coef,
                "needs non-reentrant gradient checkpointing (ms-swift checkpoints reentrantly by default on one "
                "process, and a reentrant checkpoint records no load-balancing loss)",
                "add --gradient_checkpointing_kwargs '{\"use_reentrant\": false}', or --gradient_checkpointing false",
            )


def build_config(args: Any, model: Any = None, model_kwargs: dict[str, Any] | None = None) -> RLoraConfig:
    """The run's `RLoraConfig`. With `model`, the targets as ms-swift expands them for `--tuner_type lora`
    (`all-linear`, multimodal regexes, the Mamba filter); without (the check before the model loads), PEFT's
    default targets, since only the values are checked."""
    options = rlora_options(model_kwargs)
    refuse_unsupported(args, options)
    lora = {"r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    task_type = TASK_TYPES[_task_type(args)]
    if model is not None:
        from swift.pipelines.train.tuner import get_modules_to_save, get_target_modules

        lora["target_modules"] = get_target_modules(args, model)
        lora["modules_to_save"] = get_modules_to_save(args, model, task_type) or None
    init_weights = args.init_weights if isinstance(args.init_weights, bool) else args.init_weights.lower() == "true"
    return HOST.build_config(
        {**lora, "use_rslora": args.use_rslora, **options},
        run_seed=args.seed,
        task_type=task_type,
        init_weights=init_weights,
    )


class RLoraTuner(PeftTuner):
    """`--tuner_type rlora`. Saving is PeftTuner's: PEFT's save_pretrained of the adapter `default`."""

    @staticmethod
    def prepare_model(args: Any, model: Any) -> PeftModel:
        config = build_config(args, model, args.model_kwargs)
        logger.info(f"rlora_config: {config}")
        if base := absolute_base(model.name_or_path):
            model.name_or_path = base  # the adapter finds its base from any working directory
        return get_peft_model(model, config)

    @staticmethod
    def from_pretrained(model: Any, model_id: str, **kwargs: Any) -> PeftModel:
        """The saved adapter's own forward settings govern it; a training run (resume, `--adapters` in sft or
        rlhf: `is_trainable`) applies its own training-only settings (router_aux_loss_coef)."""
        model = PeftModel.from_pretrained(model, model_id, **kwargs)
        if kwargs.get("is_trainable"):
            saved = model.peft_config[kwargs.get("adapter_name", "default")]
            ignored = adopt_saved_config(saved, rlora_options())
            if ignored:
                logger.warning(f"R-LoRA: the adapter in {model_id} governs these settings: {'; '.join(ignored)}")
        return model


def metrics_callback(args: Any, trainer: Any) -> RLoraMetricsCallback:
    """`--callbacks rlora_metrics`: the rlora/... router metrics in every train record. ms-swift builds callbacks
    before the trainer has its model (trainers/mixin.py `_get_callbacks`), so the callback takes the model at train
    begin and adds its values to each record in `on_log`, as with LLaMA-Factory."""
    return RLoraMetricsCallback(None, metrics=True)


def register() -> None:
    tuners_map[TUNER_TYPE] = RLoraTuner
    callbacks_map[METRICS_CALLBACK] = metrics_callback


def check_arguments(args: Any) -> None:
    """Refuse a bad R-LoRA run from its arguments alone, before ms-swift loads a model or a dataset."""
    if args.tuner_type != TUNER_TYPE:
        return
    if getattr(args, "merge_lora", False):  # swift export / infer / merge-lora
        raise HOST.refusal("merge_lora", args.merge_lora, "merge")
    if getattr(args, "infer_backend", "transformers") not in ("transformers", "pt"):
        raise HOST.error(
            "infer_backend",
            args.infer_backend,
            "is not supported: that engine would load the adapter as a plain LoRA, without its router",
            "use `--infer_backend transformers`, or serve the adapter with vLLM through rlora_plugin.vllm_plugin "
            "(docs/export-and-serving.md)",
        )
    if not hasattr(args, "lora_rank"):  # not a training run: the saved adapter governs
        return
    model_kwargs = json_parse_to_dict(args.model_kwargs)
    if args.adapters or getattr(args, "resume_from_checkpoint", None):  # the saved adapter's config governs
        refuse_lost_aux_loss(args, rlora_options(model_kwargs))
    else:
        build_config(args, model_kwargs=model_kwargs)


def arguments_being_parsed() -> Any:
    """The ms-swift arguments object whose `__post_init__` is importing the plugin, or None (a dataloader worker
    replaying the import, a Python caller). ms-swift's tuner API has no argument-time hook, and the first plugin code
    to run is this import (`BaseArguments._import_external_plugins`, after `args.json` is read and before the model
    loads), so the object is read, never written, from the calling frame (docs/compatibility.md)."""
    from swift.arguments import BaseArguments

    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("self"), BaseArguments):
        frame = frame.f_back
    return None if frame is None else frame.f_locals["self"]
