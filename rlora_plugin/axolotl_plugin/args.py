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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlora_plugin.config import RLoraConfig

ADAPTER_NAME = "rlora"

# RLoraConfig field -> the Axolotl config key it comes from (for error messages).
AXOLOTL_KEY = {
    "r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "use_rslora": "peft_use_rslora",
    "target_modules": "lora_target_modules",
    "exclude_modules": "lora_exclude_modules",
    "layers_to_transform": "peft_layers_to_transform",
    "layers_pattern": "peft_layers_pattern",
    "modules_to_save": "lora_modules_to_save",
    "num_heads": "rlora.num_heads",
    "init": "rlora.init",
    "init_gamma": "rlora.init_gamma",
    "head_dropout": "rlora.head_dropout",
    "router_init": "rlora.router_init",
    "router_temperature": "rlora.router_temperature",
    "init_seed": "rlora.init_seed",
    "router_top_k": "rlora.router_top_k",
    "router_aux_loss_coef": "rlora.router_aux_loss_coef",
}

_MERGE_WHY = "R-LoRA's router mixes its heads per token, so the adapter cannot be merged into the base weights"
_MERGE_FIX = (
    "remove `merge_lora` (and do not run `axolotl merge-lora` on an R-LoRA adapter); serve it unmerged with "
    "`axolotl inference` and `lora_model_dir`, or with `import rlora_plugin` + `PeftModel.from_pretrained`"
)

# key -> (why, fix) for options that are refused when set to a truthy value with `adapter: rlora`.
REFUSED = {
    "merge_lora": (_MERGE_WHY, _MERGE_FIX),
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


def refuse_incompatible(data: dict) -> None:
    """Raise ValueError for the first option in a raw Axolotl config that R-LoRA cannot honour."""
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


def _as_in_config(name: str, note: str = "") -> Any:
    """A field of the `rlora:` block with `RLoraConfig`'s default and help text, so the two never drift."""
    spec = RLoraConfig.__dataclass_fields__[name]
    return Field(default=spec.default, description=f"{spec.metadata['help']} {note}".strip())


class RLoraOptions(BaseModel):
    """R-LoRA's own settings, under the `rlora:` key. Defaults are the paper's (the authors' script)."""

    model_config = ConfigDict(extra="forbid")

    num_heads: int = _as_in_config("num_heads", "Paper script: 5.")
    init: str = _as_in_config("init")
    init_gamma: float = _as_in_config("init_gamma")
    head_dropout: str = _as_in_config("head_dropout", "The rate is `lora_dropout`.")
    router_init: str = _as_in_config("router_init")
    router_temperature: float = _as_in_config("router_temperature")
    router_top_k: int | None = _as_in_config("router_top_k")
    router_aux_loss_coef: float = _as_in_config("router_aux_loss_coef", "Logged as `rlora/aux_loss`; e.g. 0.01.")
    metrics: bool = Field(
        default=True,
        description=(
            "Log router and head-diversity metrics (`rlora/...`: router entropy, head load, head cosine "
            "similarities) every `logging_steps`. false turns them off."
        ),
    )
    init_seed: int | None = Field(
        default=None,
        description=(
            "Seed of the adapter initialization (per layer, from this seed and the layer name, so every "
            "rank builds the same adapter). Default: the run's `seed`, or 0 if that is unset."
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
            refuse_incompatible(data)
        return data

    @model_validator(mode="after")
    def rlora_check_values(self):
        if getattr(self, "adapter", None) == ADAPTER_NAME:
            if self.rlora is None:
                self.rlora = RLoraOptions()
            build_rlora_config(self)  # raises a ValueError naming the Axolotl key
            if self.rlora.router_aux_loss_coef > 0 and getattr(self, "gradient_checkpointing", None):
                self._rlora_non_reentrant_checkpointing()
        return self

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


def rlora_config_kwargs(cfg: Any, target_modules: Any = None) -> dict[str, Any]:
    """`RLoraConfig` keyword arguments from an Axolotl config (a DictDefault or the pydantic model)."""
    options = rlora_options(cfg)
    init_seed = options.init_seed
    if init_seed is None:
        init_seed = _get(cfg, "seed") or 0
    if target_modules is None:
        target_modules = _get(cfg, "lora_target_modules") or None
        if _get(cfg, "lora_target_linear"):
            target_modules = "all-linear"
    kwargs = {
        "r": _get(cfg, "lora_r"),
        "lora_alpha": _get(cfg, "lora_alpha"),
        "lora_dropout": _get(cfg, "lora_dropout"),
        "use_rslora": bool(_get(cfg, "peft_use_rslora")),
        "target_modules": target_modules,
        "exclude_modules": _get(cfg, "lora_exclude_modules") or None,
        "layers_to_transform": _get(cfg, "peft_layers_to_transform"),
        "layers_pattern": _get(cfg, "peft_layers_pattern"),
        "modules_to_save": _get(cfg, "lora_modules_to_save") or None,
        "num_heads": options.num_heads,
        "init": options.init,
        "init_gamma": options.init_gamma,
        "head_dropout": options.head_dropout,
        "router_init": options.router_init,
        "router_temperature": options.router_temperature,
        "router_top_k": options.router_top_k or None,
        "router_aux_loss_coef": options.router_aux_loss_coef,
        "init_seed": init_seed,
    }
    # Unset Axolotl keys fall back to RLoraConfig's defaults.
    return {k: v for k, v in kwargs.items() if v is not None}


def build_rlora_config(cfg: Any, target_modules: Any = None, **extra: Any):
    """Build an `RLoraConfig` from an Axolotl config; its ValueError is re-raised naming the Axolotl key."""
    kwargs = rlora_config_kwargs(cfg, target_modules)
    try:
        return RLoraConfig(**kwargs, **extra)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        match = re.search(r"`(\w+)` = ", message)
        key = AXOLOTL_KEY.get(match.group(1), match.group(1)) if match else None
        where = f"config key `{key}`" if key else "the R-LoRA settings"
        raise ValueError(f"adapter: rlora: invalid {where}: {message}") from exc
