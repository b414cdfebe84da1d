"""The configuration of an R-LoRA adapter, saved as `adapter_config.json`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from peft.config import PeftConfig
from peft.utils import PeftType


class RLoraConfigError(ValueError):
    """A bad `RLoraConfig` value. Carries the field name, so a host framework can name its own config key."""

    def __init__(self, key: str, value: Any, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"RLoraConfig: `{key}` = {value!r} is invalid: {fix}")


@dataclass
class RLoraConfig(PeftConfig):
    """Configuration of an [`RLoraModel`]: HydraLoRA's shared `A`, `num_heads` up-projections `B_i` and a
    per-token router, with R-LoRA's multi-head random initialization and multi-head dropout.

    The defaults are the paper's method (random init, per-head dropout 0.1, zero router). HydraLoRA is
    `init="zero", head_dropout="shared"`; plain LoRA is `num_heads=1, init="zero"`.
    """

    r: int = field(
        default=8, metadata={"help": "Rank of the shared down-projection A (and of every head).", "host": "lora"}
    )
    lora_alpha: float = field(
        default=16,
        metadata={"help": "Scale numerator: the update is scaled by lora_alpha / r (or / sqrt(r)).", "host": "lora"},
    )
    lora_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout rate on the rank-r features A x, in [0, 1). 0 turns dropout off.", "host": "lora"},
    )
    num_heads: int = field(default=5, metadata={"help": "Number of up-projection heads B_i mixed by the router."})
    head_dropout: Literal["per_head", "shared"] = field(
        default="per_head",
        metadata={
            "help": "'per_head': an independent dropout mask per head (R-LoRA's multi-head dropout); "
            "'shared': one mask for all heads (HydraLoRA)."
        },
    )
    init: Literal["random", "zero"] = field(
        default="random",
        metadata={
            "help": "'random': A and every B_i drawn independently at random (R-LoRA), with a frozen rank-r "
            "offset path that makes the initial adapter output zero; 'zero': Kaiming-uniform A and B_i = 0 "
            "(HydraLoRA)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "PEFT's convention. True: the adapted model equals the base model at init (the offset path of "
            "init='random', zero heads with init='zero'). False: neither (no offset path; init='zero' draws the "
            "heads like nn.Linear), so the adapter changes the output from the start; for tests and debugging.",
            "host": "none",
        },
    )
    init_gamma: float = field(
        default=64.0,
        metadata={
            "help": "gamma of the random init: weights scale as d_out^(1/4) / sqrt(gamma). Must be > 0.",
            "role": "init",
        },
    )
    router_init: Literal["zero", "kaiming"] = field(
        default="zero",
        metadata={
            "help": "'zero': uniform gates at step 0, so the adapted model equals the base model exactly at "
            "init; 'kaiming': the authors' choice, exact at init only approximately.",
            "role": "init",
        },
    )
    router_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature tau of the router: gates = softmax(W_g x / tau)."}
    )
    router_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Sparse routing: keep each token's k largest gates, renormalized to sum to 1, and zero the "
            "others. None or 0: dense routing over all heads (the method's default)."
        },
    )
    router_aux_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the Switch/Mixtral load-balancing loss N * sum_i f_i P_i (averaged over layers), "
            "added to the training loss inside the model (RLoraModel.forward), in every host. 0 turns it off.",
            "role": "training",
        },
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Scale by lora_alpha / sqrt(r) (rsLoRA) instead of lora_alpha / r.", "host": "lora"},
    )
    init_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the initialization. Each layer draws from a generator seeded by this value and the "
            "layer's name, so every rank and every run builds the same adapter.",
            "role": "init",
            "host": "seed",
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match), a regex, or 'all-linear'. Only nn.Linear modules "
            "(and GPT-2's Conv1D) can be adapted. If None, PEFT's LoRA defaults for the architecture are used.",
            "role": "targets",
            "host": "lora",
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex of modules not to adapt.", "role": "targets", "host": "lora"},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only adapt the decoder layers with these indices.", "role": "targets", "host": "lora"},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList holding the layers (e.g. 'layers'), with layers_to_transform.",
            "role": "targets",
            "host": "lora",
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules besides the adapter layers to train fully and save (e.g. 'lm_head').",
            "role": "targets",
            "host": "lora",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.RLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()
        if self.router_top_k == 0:
            self.router_top_k = None  # 0 and None both mean dense routing; keep one spelling

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """As PEFT's, and remembers where the adapter came from (not saved), so load errors can name its file."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.source = "/".join(p for p in (str(pretrained_model_name_or_path), subfolder) if p)
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """As PEFT's, and adds the R-LoRA section to the model card beside it. `PeftModel.save_pretrained` writes
        its card before it saves the configs, and the config is the part of that save a PEFT method owns."""
        super().save_pretrained(save_directory, **kwargs)
        self.write_model_card(save_directory)

    def write_model_card(self, directory: str) -> None:
        """The R-LoRA section of `directory`/README.md (how to load the adapter, its settings)."""
        from .model_card import write_card

        write_card(directory, {name: getattr(self, name) for name in own_field_types()})

    def _validate(self) -> None:
        for key in own_field_types():
            check_type(key, getattr(self, key))

        def require(key: str, ok: bool, fix: str) -> None:
            if not ok:
                raise RLoraConfigError(key, getattr(self, key), fix)

        require("r", self.r >= 1, "the rank must be an integer >= 1, e.g. r=8.")
        require("num_heads", self.num_heads >= 1, "use an integer >= 1 (one head is plain LoRA and keeps no router).")
        require(
            "lora_alpha",
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            "the update is scaled by lora_alpha / r, so it must be a finite number > 0 (0 would train nothing); "
            "e.g. 16.",
        )
        require(
            "lora_dropout",
            0.0 <= self.lora_dropout < 1.0,
            "the dropout rate must be in [0, 1); use 0 to turn dropout off.",
        )
        require(
            "init_gamma",
            math.isfinite(self.init_gamma) and self.init_gamma > 0,
            "gamma must be a finite number > 0 (the paper uses 64; infinity would give all-zero heads that never "
            "train).",
        )
        require(
            "router_temperature",
            math.isfinite(self.router_temperature) and self.router_temperature > 0,
            "the softmax temperature must be a finite number > 0 (default 1.0).",
        )
        require(
            "router_top_k",
            self.router_top_k is None or 0 <= self.router_top_k <= self.num_heads,
            f"use an integer in [1, num_heads={self.num_heads}], or 0 / None for dense routing.",
        )
        require(
            "router_aux_loss_coef",
            math.isfinite(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0,
            "the loss weight must be a finite number >= 0 (0 turns it off; e.g. 0.01).",
        )
        require("init_seed", self.init_seed >= 0, "the seed must be an integer >= 0.")
        require(
            "layers_to_transform",
            not (isinstance(self.target_modules, str) and self.layers_to_transform is not None),
            "it cannot be combined with a regex `target_modules`; list the names.",
        )
        require(
            "layers_pattern",
            not (self.layers_pattern and self.layers_to_transform is None),
            "it only applies together with `layers_to_transform`.",
        )


def rlora_fields() -> tuple[str, ...]:
    """R-LoRA's own options, which a host framework exposes under its own R-LoRA keys: every field of
    `RLoraConfig` without a "host" entry in its metadata ("lora": the host's own LoRA key sets it; "seed": the
    host defaults it to the run's seed; "none": not a host setting)."""
    return tuple(name for name in own_field_types() if "host" not in _metadata(name))


def fields_with_role(role: str | None) -> tuple[str, ...]:
    """`RLoraConfig`'s own fields by the role in their metadata: "init" (they shape only a fresh adapter's
    initial weights), "training" (they act only while training, so a run's own setting applies even to a
    loaded adapter), "targets" (which modules are adapted), or None (the settings that define the adapter's
    forward pass: a saved adapter's value governs when it is loaded)."""
    return tuple(name for name in own_field_types() if _metadata(name).get("role") == role)


def _metadata(name: str) -> Any:
    return RLoraConfig.__dataclass_fields__[name].metadata


@cache
def own_field_types() -> dict[str, Any]:
    """The type of every field `RLoraConfig` declares itself (not PEFT's base fields), resolved."""
    hints = get_type_hints(RLoraConfig)
    return {name: hints[name] for name in RLoraConfig.__annotations__}


def check_type(key: str, value: Any) -> None:
    """Strict types for the scalar fields (no bool for a number, no string for a number, no coercion), so a
    YAML or JSON typo is refused by name instead of failing deep inside torch."""
    hint = own_field_types()[key]
    optional = type(None) in get_args(hint)
    if optional and value is None:
        return
    scalar = next((t for t in get_args(hint) if t is not type(None)), hint) if optional else hint
    if get_origin(scalar) is Literal:
        if value not in get_args(scalar):
            raise RLoraConfigError(key, value, f"choose one of {', '.join(repr(a) for a in get_args(scalar))}.")
    elif scalar is bool:
        if not isinstance(value, bool):
            raise RLoraConfigError(key, value, "use true or false.")
    elif scalar is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RLoraConfigError(key, value, "use an integer (not a string, a float or a boolean).")
    elif scalar is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RLoraConfigError(key, value, "use a number (not a string or a boolean).")
