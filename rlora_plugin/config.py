"""The configuration of an R-LoRA adapter, saved as `adapter_config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

INIT_MODES = ("random", "zero")
HEAD_DROPOUT_MODES = ("per_head", "shared")
ROUTER_INIT_MODES = ("zero", "kaiming")


@dataclass
class RLoraConfig(PeftConfig):
    """Configuration of an [`RLoraModel`]: HydraLoRA's shared `A`, `num_heads` up-projections `B_i` and a
    per-token router, with R-LoRA's multi-head random initialization and multi-head dropout.

    The defaults are the paper's method (random init, per-head dropout 0.1, zero router). HydraLoRA is
    `init="zero", head_dropout="shared"`; plain LoRA is `num_heads=1, init="zero"`.
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared down-projection A (and of every head)."})
    lora_alpha: float = field(
        default=16,
        metadata={"help": "Scale numerator: the update is scaled by lora_alpha / r (or / sqrt(r))."},
    )
    lora_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout rate on the rank-r features A x, in [0, 1). 0 turns dropout off."},
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
            "heads like nn.Linear), so the adapter changes the output from the start; for tests and debugging."
        },
    )
    init_gamma: float = field(
        default=64.0,
        metadata={"help": "gamma of the random init: weights scale as d_out^(1/4) / sqrt(gamma). Must be > 0."},
    )
    router_init: Literal["zero", "kaiming"] = field(
        default="zero",
        metadata={
            "help": "'zero': uniform gates at step 0, so the adapted model equals the base model exactly at "
            "init; 'kaiming': the authors' choice, exact at init only approximately."
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
            "help": "Weight of the Switch/Mixtral load-balancing loss N * sum_i f_i P_i (averaged over layers) "
            "added to the training loss by the Axolotl plugin (or by you, through "
            "rlora_plugin.metrics.RouterAuxLoss). 0 turns it off."
        },
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Scale by lora_alpha / sqrt(r) (rsLoRA) instead of lora_alpha / r."}
    )
    init_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the initialization. Each layer draws from a generator seeded by this value and the "
            "layer's name, so every rank and every run builds the same adapter."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match), a regex, or 'all-linear'. Only nn.Linear modules "
            "can be adapted. If None, PEFT's LoRA defaults for the architecture are used."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the decoder layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the nn.ModuleList holding the layers (e.g. 'layers'), with layers_to_transform."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the adapter layers to train fully and save (e.g. 'lm_head')."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.RLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        def refuse(key: str, fix: str) -> None:
            raise ValueError(f"RLoraConfig: `{key}` = {getattr(self, key)!r} is invalid: {fix}")

        if not isinstance(self.r, int) or self.r < 1:
            refuse("r", "the rank must be an integer >= 1, e.g. r=8.")
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            refuse("num_heads", "use an integer >= 1 (1 head is plain LoRA with a trivial router).")
        if not 0.0 <= self.lora_dropout < 1.0:
            refuse("lora_dropout", "the dropout rate must be in [0, 1); use 0 to turn dropout off.")
        if not isinstance(self.init_weights, bool):
            refuse("init_weights", "use true (the adapted model equals the base at init) or false (PEFT's debug init).")
        if not self.init_gamma > 0:
            refuse("init_gamma", "gamma must be > 0 (the paper uses 64).")
        if not self.router_temperature > 0:
            refuse("router_temperature", "the softmax temperature must be > 0 (default 1.0).")
        if self.router_top_k is not None and (
            not isinstance(self.router_top_k, int) or not 0 <= self.router_top_k <= self.num_heads
        ):
            refuse("router_top_k", f"use an integer in [1, num_heads={self.num_heads}], or 0 / None for dense routing.")
        if not (isinstance(self.router_aux_loss_coef, (int, float)) and self.router_aux_loss_coef >= 0):
            refuse("router_aux_loss_coef", "the loss weight must be a number >= 0 (0 turns it off; e.g. 0.01).")
        for key, allowed in (
            ("init", INIT_MODES),
            ("head_dropout", HEAD_DROPOUT_MODES),
            ("router_init", ROUTER_INIT_MODES),
        ):
            if getattr(self, key) not in allowed:
                refuse(key, f"choose one of {', '.join(repr(a) for a in allowed)}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            refuse("layers_to_transform", "it cannot be combined with a regex `target_modules`; list the names.")
        if self.layers_pattern and self.layers_to_transform is None:
            refuse("layers_pattern", "it only applies together with `layers_to_transform`.")
