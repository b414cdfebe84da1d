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

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from rlora_plugin.config import RLoraConfig, RLoraConfigError, own_field_types, rlora_fields
from rlora_plugin.layer import MERGE_WHY
from rlora_plugin.registration import PEFT_TYPE_NAME
from rlora_plugin.saved import saved_peft_type

ADAPTER_NAME = "rlora"

# R-LoRA's own fields of `RLoraConfig`, set in the nested `rlora:` block (with RLoraConfig's types and defaults).
BLOCK_FIELDS = rlora_fields()
# The plain-LoRA fields of `RLoraConfig` -> the Axolotl key they come from (Axolotl's own keys keep their meaning).
LORA_KEYS = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "use_rslora": "peft_use_rslora",
    "target_modules": "lora_target_modules",
    "exclude_modules": "lora_exclude_modules",
    "layers_to_transform": "peft_layers_to_transform",
    "layers_pattern": "peft_layers_pattern",
    "modules_to_save": "lora_modules_to_save",
}


def axolotl_key(field_name: str) -> str:
    """The Axolotl config key an `RLoraConfig` field is set with, for error messages."""
    return LORA_KEYS.get(field_name, f"rlora.{field_name}")


_MERGE_FIX = (
    "remove `merge_lora` (and do not run `axolotl merge-lora` on an R-LoRA adapter); serve it unmerged with "
    "`axolotl inference` and `lora_model_dir`, or with `import rlora_plugin` + `PeftModel.from_pretrained`; "
    "or export it with frozen gates as a plain LoRA that merges exactly (`axolotl rlora-export ADAPTER_DIR "
    "OUT_DIR --gates uniform`), then merge that with `adapter: lora`"
)

# key -> (why, fix) for options that are refused when set to a truthy value with `adapter: rlora`.
REFUSED = {
    "merge_lora": (MERGE_WHY, _MERGE_FIX),
    "gptq": (
        "R-LoRA adapts torch.nn.Linear layers only, not GPTQ's quantized linear layers",
        "set `gptq: false` and use a full-precision base model",
    ),
    "relora": (
        "ReLoRA restarts merge the adapter into the base weights, which R-LoRA's per-token router forbids",
        "remove `relora` (and the `jagged_restart_*` keys)",
    ),
    "peft_use_dora": (
        "DoRA is a variant of plain LoRA; R-LoRA has no magnitude vector",
        "remove `peft_use_dora`, or use `adapter: lora`",
    ),
    "lora_rank_pattern": (
        "R-LoRA uses one rank for every adapted layer",
        "remove `lora_rank_pattern` and set `lora_r`",
    ),
    "lora_alpha_pattern": (
        "R-LoRA uses one alpha for every adapted layer",
        "remove `lora_alpha_pattern` and set `lora_alpha`",
    ),
    "lora_target_parameters": (
        "R-LoRA adapts nn.Linear modules, not raw (e.g. fused MoE expert) parameters",
        "remove `lora_target_parameters` and list modules in `lora_target_modules`",
    ),
    "peft_init_lora_weights": (
        "R-LoRA has its own initialization",
        "remove `peft_init_lora_weights` and use `rlora.init` ('random' or 'zero')",
    ),
    "loraplus_lr_ratio": (
        "Axolotl's LoRA+ optimizer groups parameters by plain-LoRA names and was never checked with R-LoRA",
        "remove `loraplus_lr_ratio`",
    ),
}
_KERNEL_KEY = re.compile(r"^lora_\w+_kernel$")
_KERNEL_REFUSAL = (
    "Axolotl's fused LoRA kernels compute plain LoRA's forward and would bypass R-LoRA's router and heads "
    "(they are also CUDA-only)",
    "set `{key}: false` or remove it (Axolotl never auto-enables them for `adapter: rlora`)",
)


def _refusal(key: str, value: Any, why: str, fix: str) -> str:
    return f"adapter: rlora does not support `{key}: {value!r}`: {why}. Fix: {fix}."


def refuse_incompatible(data: dict, axolotl_keys: Any = ()) -> None:
    """Raise ValueError for the first option in a raw Axolotl config that R-LoRA cannot honour, or an R-LoRA
    key written outside the `rlora:` block (Axolotl would drop it without a word); `axolotl_keys` are the
    top-level keys Axolotl itself knows."""
    for key in sorted(data):
        if key in RLoraOptions.model_fields and key not in axolotl_keys:
            raise ValueError(
                f"adapter: rlora: `{key}: {data[key]!r}` is an R-LoRA setting written at the top level of the "
                f"config, where it would be ignored. Fix: move it into the `rlora:` block as `rlora.{key}` "
                f"(rlora:\n  {key}: {data[key]!r})."
            )
    if data.get("load_in_4bit") and data.get("load_in_8bit"):
        raise ValueError(
            "adapter: rlora: `load_in_4bit: true` and `load_in_8bit: true` are both set, and only one "
            "quantization can be used. Fix: keep one of them."
        )
    for key, (why, fix) in REFUSED.items():
        if data.get(key):
            raise ValueError(_refusal(key, data[key], why, fix))
    for key in sorted(data):
        if _KERNEL_KEY.match(key) and data[key]:
            why, fix = _KERNEL_REFUSAL
            raise ValueError(_refusal(key, data[key], why, fix.format(key=key)))
    peft = data.get("peft")
    loftq = peft.get("loftq_config") if isinstance(peft, dict) else getattr(peft, "loftq_config", None)
    if loftq:
        raise ValueError(
            _refusal(
                "peft.loftq_config",
                loftq,
                "LoftQ initializes plain LoRA from a quantized base",
                "remove `peft.loftq_config`; R-LoRA's initialization is set by `rlora.init`",
            )
        )


_NOTES = {
    "num_heads": "Paper script: 5.",
    "head_dropout": "The rate is `lora_dropout`.",
    "router_aux_loss_coef": "Logged as `rlora/aux_loss`; e.g. 0.01.",
}


def _as_in_config(name: str) -> tuple[Any, Any]:
    """A field of the `rlora:` block with `RLoraConfig`'s type, default and help text: one source."""
    spec = RLoraConfig.__dataclass_fields__[name]
    help_text = f"{spec.metadata['help']} {_NOTES.get(name, '')}".strip()
    return own_field_types()[name], Field(default=spec.default, description=help_text)


# R-LoRA's own settings, under the `rlora:` key: every `BLOCK_FIELDS` entry of `RLoraConfig`, plus two
# Axolotl-side settings. Strict types: `num_heads: true` or `init_gamma: "64"` is an error, not a coercion.
RLoraOptions = create_model(
    "RLoraOptions",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="R-LoRA's own settings, under the `rlora:` key. Defaults are the paper's (the authors' script).",
    **{name: _as_in_config(name) for name in BLOCK_FIELDS},
    metrics=(
        bool,
        Field(
            default=True,
            description=(
                "Log router and head-diversity metrics (`rlora/...`: router entropy, head load, head cosine "
                "similarities) every `logging_steps`. false turns them off."
            ),
        ),
    ),
    init_seed=(
        int | None,
        Field(
            default=None,
            description=(
                "Seed of the adapter initialization (per layer, from this seed and the layer name, so every "
                "rank builds the same adapter). Default: the run's `seed`, or 0 if that is unset."
            ),
        ),
    ),
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
            build_rlora_config(self)  # raises a ValueError naming the Axolotl key
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
            raise ValueError(
                f"adapter: rlora: `lora_model_dir` is not loaded with `rl: {rl}`: Axolotl's preference-training "
                "path builds a fresh adapter from the config and lets TRL wrap the model, so the saved adapter "
                "would be ignored. Fix: remove `lora_model_dir` (or train without `rl`)."
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
            raise ValueError(
                "adapter: rlora: resuming an FSDP2 run from a FULL_STATE_DICT checkpoint restores the trainer state "
                f"but not the adapter weights with Axolotl {version('axolotl')} (fixed in 0.21). Fix: checkpoint "
                "with `fsdp_config.state_dict_type: SHARDED_STATE_DICT`, or use Axolotl >= 0.21."
            )

    def _rlora_non_reentrant_checkpointing(self) -> None:
        """The load-balancing loss is computed inside the checkpointed decoder layers; a reentrant checkpoint
        runs them without gradients, so the loss would silently not train the router. Axolotl 0.19 defaults
        to reentrant when `gradient_checkpointing_kwargs` is unset: ask for non-reentrant instead."""
        gc_kwargs = getattr(self, "gradient_checkpointing_kwargs", None)
        if gc_kwargs is None:
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        elif gc_kwargs.get("use_reentrant"):
            raise ValueError(
                "adapter: rlora: `rlora.router_aux_loss_coef` > 0 does not work with "
                "`gradient_checkpointing_kwargs.use_reentrant: true` (a reentrant checkpoint runs the router "
                "without gradients, so the loss would silently not train it). Fix: set `use_reentrant: false` "
                "(or remove `gradient_checkpointing_kwargs`), or `rlora.router_aux_loss_coef: 0`."
            )
        elif "use_reentrant" not in gc_kwargs:
            self.gradient_checkpointing_kwargs = {**gc_kwargs, "use_reentrant": False}


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


def rlora_config_kwargs(cfg: Any, targets: Any = None) -> dict[str, Any]:
    """`RLoraConfig` keyword arguments from an Axolotl config (a DictDefault or the pydantic model)."""
    options = rlora_options(cfg)
    init_seed = options.init_seed
    if init_seed is None:
        init_seed = _get(cfg, "seed") or 0
    kwargs = {
        "r": _get(cfg, "lora_r"),
        "lora_alpha": _get(cfg, "lora_alpha"),
        "lora_dropout": _get(cfg, "lora_dropout"),
        "use_rslora": bool(_get(cfg, "peft_use_rslora")),
        "target_modules": targets if targets is not None else target_modules(cfg),
        "exclude_modules": _get(cfg, "lora_exclude_modules") or None,
        "layers_to_transform": _get(cfg, "peft_layers_to_transform"),
        "layers_pattern": _get(cfg, "peft_layers_pattern"),
        "modules_to_save": _get(cfg, "lora_modules_to_save") or None,
        **{name: getattr(options, name) for name in BLOCK_FIELDS},
        "init_seed": init_seed,
    }
    # Unset Axolotl keys fall back to RLoraConfig's defaults.
    return {k: v for k, v in kwargs.items() if v is not None}


def build_rlora_config(cfg: Any, targets: Any = None, **extra: Any) -> RLoraConfig:
    """Build an `RLoraConfig` from an Axolotl config; its errors are re-raised naming the Axolotl key."""
    try:
        return RLoraConfig(**rlora_config_kwargs(cfg, targets), **extra)
    except RLoraConfigError as exc:
        raise ValueError(f"adapter: rlora: invalid config key `{axolotl_key(exc.key)}`: {exc}") from exc


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
        raise ValueError(f"adapter: rlora: `lora_model_dir: {path!r}` {where}. Fix: {fix}.")
    if peft_type != PEFT_TYPE_NAME:
        raise ValueError(
            f"adapter: rlora: `lora_model_dir: {path!r}` holds a {peft_type} adapter (peft_type in "
            f"adapter_config.json), not an R-LoRA one ({PEFT_TYPE_NAME}). Fix: {fix}; a plain LoRA adapter "
            "is loaded with `adapter: lora`."
        )
