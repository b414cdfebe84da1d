"""The configuration of an R-LoRA adapter, saved as `adapter_config.json`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from peft.config import PeftConfig
from peft.utils import PeftType

from .errors import RLoraConfigError

__all__ = ["RLoraConfig", "RLoraConfigError", "Role", "Source", "fields_from", "fields_with_role", "option"]


class Source(Enum):
    """Where a host framework (the Axolotl plugin, the LLaMA-Factory launcher) takes a field's value from."""

    LORA = "lora"  # the host's own LoRA key, with the host's meaning and default (`lora_r`, `lora_rank`, ...)
    RLORA = "rlora"  # the host's R-LoRA key (`rlora.<field>` in Axolotl, `rlora_<field>` in LLaMA-Factory)
    RUN_SEED = "run_seed"  # an R-LoRA key that defaults to the run's `seed` instead of the field's default
    NONE = "none"  # not a host setting (for tests and the Python API)


class Role(Enum):
    """Whose value counts when a host loads a saved adapter, for a field that is not only the new adapter's
    (those, the initialization and the targets, have the role None: a loaded adapter keeps what it was made
    with, and there is nothing to compare)."""

    FORWARD = "forward"  # the adapter's forward pass: a saved adapter's own value governs it (a host warns)
    TRAINING = "training"  # only training: a run's own setting applies even to a loaded adapter


def option(default: Any, help: str, *, source: Source, role: Role | None) -> Any:
    """A field of `RLoraConfig`: its help text (PEFT's `metadata["help"]`), where hosts take it from and what it
    governs (`Role`, or None for a new adapter's initialization and targets). Both are required keywords, so a
    field cannot be left unclassified."""
    if not (isinstance(source, Source) and (role is None or isinstance(role, Role))):
        raise TypeError(
            f"option({default!r}, ...): source must be a Source and role a Role or None, not {source!r}, {role!r}"
        )
    return field(default=default, metadata={"help": help, "source": source, "role": role})


@dataclass
class RLoraConfig(PeftConfig):
    """Configuration of an [`RLoraModel`]: HydraLoRA's shared `A`, `num_heads` up-projections `B_i` and a
    per-token router, with R-LoRA's multi-head random initialization and multi-head dropout.

    The defaults are the paper's method (random init, per-head dropout 0.1, zero router). HydraLoRA is
    `init="zero", head_dropout="shared"`; plain LoRA is `num_heads=1, init="zero"`.
    """

    r: int = option(
        8, "Rank of the shared down-projection A (and of every head).", source=Source.LORA, role=Role.FORWARD
    )
    lora_alpha: float = option(
        16,
        "Scale numerator: the update is scaled by lora_alpha / r (or / sqrt(r)).",
        source=Source.LORA,
        role=Role.FORWARD,
    )
    lora_dropout: float = option(
        0.1,
        "Dropout rate on the rank-r features A x, in [0, 1). 0 turns dropout off.",
        source=Source.LORA,
        role=Role.FORWARD,
    )
    num_heads: int = option(
        5, "Number of up-projection heads B_i mixed by the router.", source=Source.RLORA, role=Role.FORWARD
    )
    head_dropout: Literal["per_head", "shared"] = option(
        "per_head",
        "'per_head': an independent dropout mask per head (R-LoRA's multi-head dropout); "
        "'shared': one mask for all heads (HydraLoRA).",
        source=Source.RLORA,
        role=Role.FORWARD,
    )
    init: Literal["random", "zero"] = option(
        "random",
        "'random': A and every B_i drawn independently at random (R-LoRA), with a frozen rank-r "
        "offset path that makes the initial adapter output zero; 'zero': Kaiming-uniform A and B_i = 0 "
        "(HydraLoRA).",
        source=Source.RLORA,
        role=Role.FORWARD,
    )
    init_weights: bool = option(
        True,
        "PEFT's convention. True: the adapted model equals the base model at init (the offset path of "
        "init='random', zero heads with init='zero'). False: neither (no offset path; init='zero' draws the "
        "heads like nn.Linear), so the adapter changes the output from the start; for tests and debugging.",
        source=Source.NONE,
        role=Role.FORWARD,
    )
    init_gamma: float = option(
        64.0,
        "gamma of the random init: weights scale as d_out^(1/4) / sqrt(gamma). Must be > 0.",
        source=Source.RLORA,
        role=None,
    )
    router_init: Literal["zero", "kaiming"] = option(
        "zero",
        "'zero': uniform gates at step 0, so the adapted model equals the base model exactly at "
        "init; 'kaiming': the authors' choice, exact at init only approximately.",
        source=Source.RLORA,
        role=None,
    )
    router_temperature: float = option(
        1.0,
        "Softmax temperature tau of the router: gates = softmax(W_g x / tau).",
        source=Source.RLORA,
        role=Role.FORWARD,
    )
    router_top_k: int | None = option(
        None,
        "Sparse routing: keep each token's k largest gates, renormalized to sum to 1, and zero the "
        "others. None or 0: dense routing over all heads (the method's default).",
        source=Source.RLORA,
        role=Role.FORWARD,
    )
    router_aux_loss_coef: float = option(
        0.0,
        "Weight of the Switch/Mixtral load-balancing loss N * sum_i f_i P_i (averaged over layers), "
        "added to the training loss inside the model (RLoraModel.forward), in every host. 0 turns it off.",
        source=Source.RLORA,
        role=Role.TRAINING,
    )
    use_rslora: bool = option(
        False,
        "Scale by lora_alpha / sqrt(r) (rsLoRA) instead of lora_alpha / r.",
        source=Source.LORA,
        role=Role.FORWARD,
    )
    init_seed: int = option(
        0,
        "Seed of the initialization. Each layer draws from a generator seeded by this value and the "
        "layer's name, so every rank and every run builds the same adapter.",
        source=Source.RUN_SEED,
        role=None,
    )
    target_modules: list[str] | str | None = option(
        None,
        "Module names (exact or suffix match), a regex, or 'all-linear'. Only nn.Linear modules "
        "(and GPT-2's Conv1D) can be adapted. If None, PEFT's LoRA defaults for the architecture are used.",
        source=Source.LORA,
        role=None,
    )
    exclude_modules: list[str] | str | None = option(
        None, "Module names or a regex of modules not to adapt.", source=Source.LORA, role=None
    )
    layers_to_transform: list[int] | int | None = option(
        None, "Only adapt the decoder layers with these indices.", source=Source.LORA, role=None
    )
    layers_pattern: list[str] | str | None = option(
        None,
        "Name of the nn.ModuleList holding the layers (e.g. 'layers'), with layers_to_transform.",
        source=Source.LORA,
        role=None,
    )
    modules_to_save: list[str] | None = option(
        None,
        "Modules besides the adapter layers to train fully and save (e.g. 'lm_head').",
        source=Source.LORA,
        role=None,
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

        require("r", self.r >= 1, "the rank must be an integer >= 1, e.g. 8.")
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


def fields_from(*sources: Source) -> tuple[str, ...]:
    """`RLoraConfig`'s own fields whose value a host takes from one of `sources` (see `Source`)."""
    return tuple(name for name in own_field_types() if field_source(name) in sources)


def fields_with_role(role: Role | None) -> tuple[str, ...]:
    """`RLoraConfig`'s own fields that govern `role` (see `Role`; None: only a new adapter's)."""
    return tuple(name for name in own_field_types() if RLoraConfig.__dataclass_fields__[name].metadata["role"] is role)


def field_source(name: str) -> Source:
    """Where a host takes the value of `RLoraConfig`'s field `name` from."""
    return RLoraConfig.__dataclass_fields__[name].metadata["source"]


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
