"""What every host framework's R-LoRA glue shares (the Axolotl plugin, the LLaMA-Factory launcher).

A host describes itself once, as a `Host`: the config line that selects R-LoRA, its keys for the LoRA fields of
`RLoraConfig` and the prefix of its R-LoRA keys, and which of its keys turn on a plain-LoRA-only feature. From
that this module builds the `RLoraConfig`, refuses those features from one table of reasons, and words every
error one way, naming the host's key, its value and the fix:

    adapter: rlora: `lora_r: 0` is invalid. Fix: the rank must be an integer >= 1, e.g. r=8.

A host module keeps only what is particular to it (Axolotl's schema and hooks, LLaMA-Factory's patches). A new
host needs a `Host` and a hook that passes its config through `Host.refuse_plain_lora_features` and
`Host.build_config` before any model loads.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    RLoraConfig,
    Role,
    Source,
    field_source,
    fields_from,
    fields_with_role,
    own_field_types,
)
from .errors import HostConfigError, RLoraConfigError
from .layer import MERGE_WHY

# Plain-LoRA-only features -> (why R-LoRA refuses them, the fix). In the texts, `{key}` is the host's key that
# turned the feature on, `{host}`, `{selector}`, `{plain_lora}`, `{adapter_key}` and `{merge_fix}` the `Host`'s
# fields, and an `RLoraConfig` field name in backticks becomes the host's key for it.
REFUSALS = {
    "dora": (
        "DoRA is a variant of plain LoRA; R-LoRA has no magnitude vector",
        "remove `{key}`, or use `{plain_lora}`",
    ),
    "loraplus": (
        "{host}'s LoRA+ optimizer groups parameters by plain-LoRA names and was never checked with R-LoRA",
        "remove `{key}`",
    ),
    "pissa": (
        "PiSSA initializes plain LoRA from the base weights' SVD; R-LoRA has its own initialization",
        "remove `{key}` and choose `init` ('random' or 'zero')",
    ),
    "pissa_convert": ("there is no PiSSA adapter to convert", "remove `{key}`"),
    "loftq": (
        "LoftQ initializes plain LoRA from a quantized base; R-LoRA has its own initialization",
        "remove `{key}` and choose `init` ('random' or 'zero')",
    ),
    "lora_init": ("R-LoRA has its own initialization", "remove `{key}` and choose `init` ('random' or 'zero')"),
    "rank_pattern": ("R-LoRA uses one rank for every adapted layer", "remove `{key}` and set `r`"),
    "alpha_pattern": ("R-LoRA uses one alpha for every adapted layer", "remove `{key}` and set `lora_alpha`"),
    "target_parameters": (
        "R-LoRA adapts nn.Linear modules, not raw (e.g. fused MoE expert) parameters",
        "remove `{key}` and list modules in `target_modules`",
    ),
    "merge": (MERGE_WHY, "remove `{key}`; {merge_fix}"),
    "merge_loaded": (
        f"it merges the loaded adapter into the base model first; {MERGE_WHY}",
        "remove `{key}` (training from `{adapter_key}` continues that R-LoRA adapter)",
    ),
    "relora": (
        "ReLoRA restarts merge the adapter into the base weights, which R-LoRA's per-token router forbids",
        "remove `{key}` (and the `jagged_restart_*` keys)",
    ),
    "gptq": (
        "R-LoRA adapts torch.nn.Linear layers only, not GPTQ's quantized linear layers",
        "set `{key}: false` and use a full-precision base model",
    ),
    "fused_lora_kernels": (
        "{host}'s fused LoRA kernels compute plain LoRA's forward and would bypass R-LoRA's router and heads "
        "(they are also CUDA-only)",
        "set `{key}: false` or remove it ({host} never auto-enables them for `{selector}`)",
    ),
    "unsloth": ("Unsloth builds its own plain LoRA layers and would skip R-LoRA's", "remove `{key}`"),
    "ktransformers": ("KTransformers builds its own plain LoRA config", "remove `{key}`"),
}

_BACKTICKED = re.compile(r"`(\w+)`")


@dataclass(frozen=True)
class Host:
    """A host framework's names for R-LoRA's settings, and what it says about them."""

    name: str  # "Axolotl"
    selector: str  # the config line that selects R-LoRA, which starts every error: "adapter: rlora"
    plain_lora: str  # the same line for plain LoRA: "adapter: lora"
    lora_keys: Mapping[str, str]  # `RLoraConfig` field (`Source.LORA`) -> the host's own key for it
    rlora_prefix: str  # the host's R-LoRA key is this prefix + the field name: "rlora." or "rlora_"
    adapter_key: str  # the key of a saved adapter to load: "lora_model_dir"
    merge_fix: str  # how to serve or export an R-LoRA adapter in this host instead of merging it
    refused: Mapping[str, str] = field(default_factory=dict)  # host key -> feature of `REFUSALS`
    refused_patterns: Mapping[str, str] = field(default_factory=dict)  # regex over host keys -> feature

    def __post_init__(self) -> None:
        # A host may lack a key for a LoRA field (LLaMA-Factory has no `exclude_modules`): its default holds.
        unknown = {*self.refused.values(), *self.refused_patterns.values()} - set(REFUSALS)
        not_lora = set(self.lora_keys) - set(fields_from(Source.LORA))
        if unknown or not_lora:
            raise ValueError(
                f"Host {self.name}: unknown features {sorted(unknown)}, not LoRA fields {sorted(not_lora)}"
            )

    def key(self, field_name: str) -> str:
        """The host's key for an `RLoraConfig` field."""
        if field_source(field_name) is Source.LORA:
            return self.lora_keys[field_name]
        return f"{self.rlora_prefix}{field_name}"

    def rlora_keys(self) -> dict[str, str]:
        """The host's R-LoRA keys -> the `RLoraConfig` field each one sets."""
        return {self.key(name): name for name in fields_from(Source.RLORA, Source.RUN_SEED)}

    def error(self, key: str, value: Any, problem: str, fix: str) -> HostConfigError:
        """The error for `key: value` in this host's config; an `RLoraConfig` field named in backticks in the
        fix is renamed to the host's key for it."""
        return HostConfigError(self.selector, key, value, problem, self._host_keys(fix))

    def refused_feature(self, key: str) -> str | None:
        """The plain-LoRA-only feature that the host's `key` turns on, if any."""
        if key in self.refused:
            return self.refused[key]
        return next((f for pattern, f in self.refused_patterns.items() if re.fullmatch(pattern, key)), None)

    def refusal(self, key: str, value: Any, feature: str) -> HostConfigError:
        """The error for `key: value`, which turns on the plain-LoRA-only `feature`."""
        why, fix = REFUSALS[feature]
        names = {
            "key": key,
            "host": self.name,
            "selector": self.selector,
            "plain_lora": self.plain_lora,
            "adapter_key": self.adapter_key,
            "merge_fix": self.merge_fix,
        }
        return self.error(key, value, f"is not supported: {why.format(**names)}", self._host_keys(fix).format(**names))

    def refuse_unknown_keys(self, keys: Mapping[str, Any], extra: Iterable[str] = ()) -> None:
        """Raise for the first of `keys` (host keys that look like R-LoRA's -> their values; in sorted order) that
        is none of the host's R-LoRA keys or its own `extra` ones, naming the close match or every key."""
        known = sorted({*self.rlora_keys(), *extra})
        for key in sorted(keys, key=str):
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"the R-LoRA keys are {', '.join(known)}"
                raise self.error(key, keys[key], "is not an R-LoRA key", hint)

    def refuse_plain_lora_features(self, config: Mapping[str, Any]) -> None:
        """Raise for the first key of a raw host config (in sorted order) that turns on a plain-LoRA-only
        feature (a truthy value)."""
        for key in sorted(config):
            feature = self.refused_feature(key)
            if feature and config[key]:
                raise self.refusal(key, config[key], feature)

    def build_config(self, settings: Mapping[str, Any], run_seed: int | None = None, **fixed: Any) -> RLoraConfig:
        """An `RLoraConfig` from `settings` (field -> the value the host's config gives it; None: unset, the
        field's default); an unset `Source.RUN_SEED` field takes `run_seed` (None: the field's default).
        `fixed` are values the host sets itself (`task_type`). Errors name the host's key."""
        kwargs = {name: value for name, value in settings.items() if value is not None}
        for name in fields_from(Source.RUN_SEED):
            if name not in kwargs and run_seed is not None:
                kwargs[name] = run_seed
        unknown = sorted(name for name in kwargs if name not in own_field_types() or not self._has_key(name))
        if unknown:
            raise TypeError(f"Host {self.name}: no host key for {unknown}")
        try:
            return RLoraConfig(**kwargs, **fixed)
        except RLoraConfigError as exc:
            raise self.error(self.key(exc.key), exc.value, "is invalid", exc.fix) from exc

    def _host_keys(self, text: str) -> str:
        return _BACKTICKED.sub(
            lambda m: f"`{self.key(m[1])}`" if m[1] in own_field_types() and self._has_key(m[1]) else m[0], text
        )

    def _has_key(self, field_name: str) -> bool:
        return field_source(field_name) is not Source.NONE and (
            field_source(field_name) is not Source.LORA or field_name in self.lora_keys
        )


def absolute_base(path: str | None) -> str | None:
    """The absolute path of a local base model directory (None for a model-hub id, which stays as the host has
    it): a saved adapter records its base, and must find it from any working directory."""
    if path and Path(path).is_dir():
        return str(Path(path).resolve())
    return None


def adopt_saved_config(saved: RLoraConfig, run: Mapping[str, Any]) -> list[str]:
    """A loaded adapter keeps its saved forward settings and takes the run's training-only ones: `run` (field ->
    the run's value) is applied to `saved` for `Role.TRAINING` fields; returns, as "field: run X, saved Y", the
    forward settings where the run differs from the saved adapter (ignored, for the host to warn about)."""
    for name in fields_with_role(Role.TRAINING):
        if name in run:
            setattr(saved, name, run[name])
    return [
        f"{name}: run {run[name]!r}, saved {getattr(saved, name)!r}"
        for name in fields_with_role(Role.FORWARD)
        if name in run and run[name] != getattr(saved, name)
    ]
