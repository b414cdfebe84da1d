"""Config schema of the R-LoRA Axolotl plugin, merged into Axolotl's config model.

Standard Axolotl keys keep their Axolotl meaning and are not redeclared here: `lora_r`, `lora_alpha`,
`lora_dropout` (Axolotl's default is 0.0, so set 0.1 for the paper's setting), `lora_target_modules`,
`lora_target_linear`, `lora_modules_to_save`, `peft_layers_to_transform`, `peft_layers_pattern`,
`peft_use_rslora` and `lora_model_dir`. Only R-LoRA's own settings live in the nested `rlora:` block.

Everything is checked when Axolotl validates the config (`load_cfg` -> `validate_config`, the first thing
`axolotl train/preprocess/inference/merge-lora` do), before any dataset or model is loaded: options R-LoRA
cannot honour are refused, and the values go through `RLoraConfig`'s own validation.

Axolotl's fused LoRA kernels (`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`,
`lora_embedding_kernel`) are auto-enabled by Axolotl only for `adapter: lora/qlora`, so an rlora run never
gets them; setting one to true explicitly is refused (they compute plain LoRA and would skip the router).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, create_model, model_validator

from rlora_plugin.config import RLoraConfig, Source, field_source, fields_from, own_field_types
from rlora_plugin.host import Host, absolute_base
from rlora_plugin.lm_eval import command as lm_eval_command
from rlora_plugin.registration import PEFT_TYPE_NAME
from rlora_plugin.saved import saved_peft_type

from . import LOG

ADAPTER_NAME = "rlora"
METRICS_KEY = "rlora.metrics"  # the plugin's own switch for the router metrics callback
LM_EVAL_PLUGIN = "axolotl.integrations.lm_eval.LMEvalPlugin"

HOST = Host(
    name="Axolotl",
    selector=f"adapter: {ADAPTER_NAME}",
    plain_lora="adapter: lora",
    # Axolotl's own keys for the plain-LoRA fields, with Axolotl's meaning (`lora_target_linear` is read besides).
    lora_keys={
        "r": "lora_r",
        "lora_alpha": "lora_alpha",
        "lora_dropout": "lora_dropout",
        "use_rslora": "peft_use_rslora",
        "target_modules": "lora_target_modules",
        "exclude_modules": "lora_exclude_modules",
        "layers_to_transform": "peft_layers_to_transform",
        "layers_pattern": "peft_layers_pattern",
        "modules_to_save": "lora_modules_to_save",
    },
    rlora_prefix="rlora.",
    adapter_key="lora_model_dir",
    merge_fix=(
        "do not run `axolotl merge-lora` on an R-LoRA adapter; serve it unmerged with `axolotl inference` and "
        "`lora_model_dir`, or with `import rlora_plugin` + `PeftModel.from_pretrained`; or export it with frozen "
        "gates as a plain LoRA that merges exactly (`axolotl rlora-export ADAPTER_DIR OUT_DIR --gates uniform`), "
        "then merge that with `adapter: lora`"
    ),
    refused={
        "merge_lora": "merge",
        "gptq": "gptq",
        "relora": "relora",
        "peft_use_dora": "dora",
        "lora_rank_pattern": "rank_pattern",
        "lora_alpha_pattern": "alpha_pattern",
        "lora_target_parameters": "target_parameters",
        "peft_init_lora_weights": "lora_init",
        "loraplus_lr_ratio": "loraplus",
    },
    # lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel, lora_embedding_kernel (Axolotl auto-enables them only
    # for adapter: lora/qlora)
    refused_patterns={r"lora_\w+_kernel": "fused_lora_kernels"},
)


METRICS_HELP = (
    "Log router and head-diversity metrics (`rlora/...`: router entropy, head load, head cosine similarities) "
    "every `logging_steps`. false turns them off."
)


class RLoraBlock(BaseModel):
    """R-LoRA's own settings, under the `rlora:` key: `RLoraConfig`'s R-LoRA fields, with its types, defaults and
    help texts (`rlora_options_model` derives them), plus `metrics`. The values are not checked here but by
    `RLoraConfig` (`Host.build_config`, from `RLoraArgs.rlora_check_values`), once, with errors that name the
    `rlora.<key>`: strict types, so `num_heads: true` or `init_gamma: "64"` is an error, not a coercion. A key
    that is none of them is refused with the close match."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def rlora_known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            HOST.refuse_unknown_keys({f"{HOST.rlora_prefix}{key}": value for key, value in data.items()}, [METRICS_KEY])
        return data


def rlora_options_model() -> type[RLoraBlock]:
    """The `rlora:` block's model, built from `RLoraConfig`'s fields that hosts take from an R-LoRA key (`Source.RLORA`,
    and `Source.RUN_SEED`, which may be unset: the run's seed). Adding such a field to `RLoraConfig` adds it here."""
    fields: dict[str, Any] = {}
    for name in fields_from(Source.RLORA, Source.RUN_SEED):
        spec = RLoraConfig.__dataclass_fields__[name]
        hint, default, note = own_field_types()[name], spec.default, ""
        if field_source(name) is Source.RUN_SEED:
            hint, default, note = hint | None, None, " Default: the run's `seed`, or 0 if that is unset."
        description = spec.metadata["help"] + note
        fields[name] = (Annotated[hint, SkipValidation], Field(default=default, description=description))
    fields["metrics"] = (Annotated[bool, SkipValidation], Field(default=True, description=METRICS_HELP))
    return create_model("RLoraOptions", __base__=RLoraBlock, __module__=__name__, **fields)


RLoraOptions = rlora_options_model()


def refuse_incompatible(data: dict, axolotl_keys: Any = ()) -> None:
    """Raise for the first option in a raw Axolotl config that R-LoRA cannot honour, or an R-LoRA key written
    outside the `rlora:` block (Axolotl would drop it without a word); `axolotl_keys` are the top-level keys
    Axolotl itself knows."""
    for key in sorted(data):
        if key in RLoraOptions.model_fields and key not in axolotl_keys:
            raise HOST.error(
                key,
                data[key],
                "is an R-LoRA setting written at the top level of the config, where it would be ignored",
                f"move it into the `rlora:` block as `rlora.{key}` (rlora:\n  {key}: {data[key]!r})",
            )
    if data.get("load_in_4bit") and data.get("load_in_8bit"):
        raise HOST.error(
            "load_in_8bit", data["load_in_8bit"], "cannot be combined with `load_in_4bit: true`", "keep one of them"
        )
    HOST.refuse_plain_lora_features(data)
    peft = data.get("peft")
    loftq = peft.get("loftq_config") if isinstance(peft, dict) else getattr(peft, "loftq_config", None)
    if loftq:
        raise HOST.refusal("peft.loftq_config", loftq, "loftq")
    refuse_post_train_lm_eval(data)


def refuse_post_train_lm_eval(data: dict) -> None:
    """Axolotl's LMEvalPlugin runs lm_eval's own `lm_eval` command on `pretrained=OUTPUT_DIR` after training:
    that process never imports rlora_plugin and takes the adapter directory for a full model, so it fails after
    training, or scores a model without the routed adapter (`lm_eval_model: BASE`; a DPO output directory, which
    also holds Axolotl's `model.safetensors`). Refused here with the command that evaluates base + adapter."""
    tasks = data.get("lm_eval_tasks")
    if LM_EVAL_PLUGIN not in (data.get("plugins") or []) or not tasks or not data.get("lm_eval_post_train", True):
        return
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    by_fewshot: dict[str | None, list[str]] = {}  # Axolotl's `task:N` means N-shot
    for task in tasks:
        name, _, shots = str(task).partition(":")
        by_fewshot.setdefault(shots or None, []).append(name)
    base, output_dir = data.get("base_model", "BASE_MODEL"), data.get("output_dir", "./model-out")
    commands = [
        lm_eval_command(
            base,
            output_dir,
            ["--tasks", ",".join(names), "--batch_size", str(data.get("lm_eval_batch_size") or 8)]
            + (["--num_fewshot", shots] if shots else [])
            + ["--output_path", f"{output_dir.rstrip('/')}/lm_eval_results"],
        )
        for shots, names in by_fewshot.items()
    ]
    raise HOST.error(
        "lm_eval_tasks",
        data["lm_eval_tasks"],
        f"is not supported with `{LM_EVAL_PLUGIN}` after training: it runs lm_eval's own `lm_eval` command on "
        "`pretrained=OUTPUT_DIR`, which never imports rlora_plugin and cannot load an R-LoRA adapter",
        "set `lm_eval_post_train: false` (or remove `lm_eval_tasks`) and, after training, evaluate the base model "
        f"with the adapter with lm_eval's options: `{' ; '.join(commands)}`",
    )


class RLoraArgs(BaseModel):
    """Adds the nested `rlora:` block and R-LoRA's checks to Axolotl's config model."""

    rlora: RLoraOptions | None = Field(
        default_factory=RLoraOptions,
        description=(
            "R-LoRA settings for `adapter: rlora` (needs the plugin `rlora_plugin.RLoraPlugin` in `plugins:`)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def rlora_refuse_incompatible(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("adapter") == ADAPTER_NAME:
            refuse_incompatible(data, cls.model_fields)
        return data

    @model_validator(mode="after")
    def rlora_check_values(self):
        if getattr(self, "adapter", None) == ADAPTER_NAME:
            if self.rlora is None:
                self.rlora = RLoraOptions()
            build_rlora_config(self)  # raises a HostConfigError naming the Axolotl key
            if not isinstance(self.rlora.metrics, bool):
                raise HOST.error(METRICS_KEY, self.rlora.metrics, "is invalid", "use true or false")
            if getattr(self, "lora_model_dir", None):
                check_adapter_dir(self.lora_model_dir)
                self._rlora_adapter_dir_is_loaded()
            self._rlora_fsdp2_resume_restores_the_adapter()
            if self.rlora.router_aux_loss_coef > 0 and getattr(self, "gradient_checkpointing", None):
                self._rlora_non_reentrant_checkpointing()
        return self

    def _rlora_adapter_dir_is_loaded(self) -> None:
        """Axolotl's DPO/IPO/KTO path asks the adapter hook for a config only and lets TRL wrap the model, so
        `lora_model_dir` would be ignored without a word (for `adapter: lora` as well)."""
        rl = getattr(self, "rl", None)
        rl = getattr(rl, "value", rl)
        if rl in ("dpo", "ipo", "kto"):
            raise HOST.error(
                "lora_model_dir",
                self.lora_model_dir,
                f"is not loaded with `rl: {rl}`: Axolotl's preference-training path builds a fresh adapter from "
                "the config and lets TRL wrap the model, so the saved adapter would be ignored",
                "remove `lora_model_dir` (or train without `rl`)",
            )

    def _rlora_fsdp2_resume_restores_the_adapter(self) -> None:
        """Axolotl 0.19 resumes an FSDP2 FULL_STATE_DICT checkpoint without its adapter weights, silently (the
        trainer state comes back, the adapter keeps its fresh init): tests/test_multiprocess.py shows it."""
        resume = getattr(self, "resume_from_checkpoint", None) or getattr(self, "auto_resume_from_checkpoints", None)
        if not resume or str(getattr(self, "fsdp_version", None) or "") != "2":
            return
        state_dict_type = _get(getattr(self, "fsdp_config", None), "state_dict_type") or "FULL_STATE_DICT"
        from importlib.metadata import version

        from packaging.version import Version

        if state_dict_type == "FULL_STATE_DICT" and Version(version("axolotl")) < Version("0.21"):
            raise HOST.error(
                "fsdp_config.state_dict_type",
                state_dict_type,
                "(the default) makes resuming an FSDP2 run restore the trainer state but not the adapter weights "
                f"with Axolotl {version('axolotl')} (fixed in 0.21)",
                "checkpoint with `fsdp_config.state_dict_type: SHARDED_STATE_DICT`, or use Axolotl >= 0.21",
            )

    def _rlora_non_reentrant_checkpointing(self) -> None:
        """The load-balancing loss is computed inside the checkpointed decoder layers; a reentrant checkpoint
        runs them without gradients, so the loss would silently not train the router. Axolotl 0.19 defaults
        to reentrant when `gradient_checkpointing_kwargs` is unset: ask for non-reentrant instead."""
        gc_kwargs = getattr(self, "gradient_checkpointing_kwargs", None)
        if gc_kwargs and gc_kwargs.get("use_reentrant"):
            raise HOST.error(
                "gradient_checkpointing_kwargs.use_reentrant",
                gc_kwargs["use_reentrant"],
                "does not work with `rlora.router_aux_loss_coef` > 0 (a reentrant checkpoint runs the router "
                "without gradients, so the loss would silently not train it)",
                "set `use_reentrant: false` (or remove `gradient_checkpointing_kwargs`), or "
                "`rlora.router_aux_loss_coef: 0`",
            )
        if gc_kwargs is None or "use_reentrant" not in gc_kwargs:
            changed = {**(gc_kwargs or {}), "use_reentrant": False}
            LOG.warning(
                "R-LoRA: `gradient_checkpointing_kwargs` changed from %r to %r: `rlora.router_aux_loss_coef` > 0 "
                "needs a non-reentrant checkpoint (a reentrant one would not train the router with the loss).",
                gc_kwargs,
                changed,
            )
            self.gradient_checkpointing_kwargs = changed


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def rlora_options(cfg: Any) -> RLoraOptions:
    """The `rlora:` block of an Axolotl config (a DictDefault or the pydantic model), with defaults."""
    block = _get(cfg, "rlora")
    if block is None:
        return RLoraOptions()
    if isinstance(block, RLoraOptions):
        return block
    return RLoraOptions.model_validate(dict(block))


def target_modules(cfg: Any, model: Any = None) -> Any:
    """Axolotl's target rule: `lora_target_modules`; `lora_target_linear` means PEFT's 'all-linear'; both
    together, the union (as Axolotl's LoRA loader does, via its own `find_all_linear_names`), which needs the
    model: without one (config validation) the listed modules stand for it."""
    modules = _get(cfg, "lora_target_modules") or None
    if not _get(cfg, "lora_target_linear"):
        return modules
    if not modules:
        return "all-linear"
    modules = modules if isinstance(modules, list) else [modules]
    if model is None:
        return sorted(set(modules))
    from axolotl.loaders.adapter import find_all_linear_names

    return sorted(set(modules) | set(find_all_linear_names(model)))


def rlora_settings(cfg: Any, targets: Any = None) -> dict[str, Any]:
    """`RLoraConfig` field -> its value in an Axolotl config (a DictDefault or the pydantic model; None: unset)."""
    options = rlora_options(cfg)
    settings = {name: _get(cfg, key) for name, key in HOST.lora_keys.items()}
    settings.update(
        use_rslora=bool(settings["use_rslora"]),
        target_modules=targets if targets is not None else target_modules(cfg),
        exclude_modules=settings["exclude_modules"] or None,  # an empty list is unset
        modules_to_save=settings["modules_to_save"] or None,
    )
    return {**settings, **{name: getattr(options, name) for name in fields_from(Source.RLORA, Source.RUN_SEED)}}


def build_rlora_config(cfg: Any, targets: Any = None, **extra: Any) -> RLoraConfig:
    """Build an `RLoraConfig` from an Axolotl config; its errors name the Axolotl key. A local `base_model` is
    recorded as an absolute path (`AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)` reads it)."""
    config = HOST.build_config(rlora_settings(cfg, targets), run_seed=_get(cfg, "seed") or 0, **extra)
    if base := absolute_base(_get(cfg, "base_model")):
        config.base_model_name_or_path = base
    return config


def check_adapter_dir(path: str) -> None:
    """`lora_model_dir` must be a saved R-LoRA adapter, in a local directory or on the model hub (as PEFT loads
    it): refused here, at config validation, instead of failing at model load after the datasets are prepared."""
    fix = "point `lora_model_dir` at the output directory of an `adapter: rlora` run, or remove it to train anew"
    peft_type = saved_peft_type(path)
    if peft_type is None:
        where = (
            "holds no adapter_config.json"
            if Path(path).is_dir()
            else "is neither a local directory nor an adapter on the model hub (offline: in its cache; a private or "
            "gated one needs `huggingface-cli login`)"
        )
        raise HOST.error("lora_model_dir", path, where, fix)
    if peft_type != PEFT_TYPE_NAME:
        raise HOST.error(
            "lora_model_dir",
            path,
            f"holds a {peft_type} adapter (peft_type in adapter_config.json), not an R-LoRA one ({PEFT_TYPE_NAME})",
            f"{fix}; a plain LoRA adapter is loaded with `adapter: lora`",
        )
