"""R-LoRA as a LLaMA-Factory fine-tuning type, through a launcher (LLaMA-Factory has no plugin mechanism).

    python -m rlora_plugin.llamafactory train CONFIG.yaml     (or: rlora-llamafactory train CONFIG.yaml)
    python -m rlora_plugin.llamafactory chat CONFIG.yaml      (also api, webchat; export is refused)

The YAML is an ordinary LLaMA-Factory config with `finetuning_type: rlora`. LLaMA-Factory's LoRA keys keep
their meaning (`lora_rank`, `lora_alpha`, `lora_dropout`, `lora_target`, `use_rslora`, `additional_target`);
R-LoRA's own settings are flat `rlora_<field>` keys, one per R-LoRA option of `RLoraConfig` (`rlora_fields()`) plus
`rlora_init_seed` (default: the run's `seed`) and `rlora_metrics`. Everything is checked when the config is
read, before any model or dataset loads.

Why a rewrite and not a new type: LLaMA-Factory branches on `finetuning_type == "lora"` in about fifteen
places (adapter loading and resuming, DPO's reference model as the adapter switched off, DDP's
`find_unused_parameters`, `label_names`, ...), and an R-LoRA adapter wants every one of them. So an
`rlora` config is rewritten to `finetuning_type: lora` with its `rlora_*` keys taken out, and only the two
places where R-LoRA differs from LoRA are patched. Every patch of LLaMA-Factory's internals, checked against
llamafactory 0.9.5 (`CHECKED_VERSION`; any other version is refused with an error before a patch is made):

1. `llamafactory.hparams.parser.read_args`: every command's config passes through it (`_parse_args` looks
   it up at call time), so an `rlora` config is validated and rewritten there.
2. `llamafactory.model.adapter.LoraConfig`: looked up at call time by `_setup_lora_tuning`, the one place a
   new adapter's config is built; returns an `RLoraConfig` from LLaMA-Factory's LoRA arguments plus the
   run's R-LoRA settings while an `rlora` config is active, a plain `LoraConfig` otherwise.
3. `llamafactory.model.adapter._setup_lora_tuning` (called by `init_adapter` at call time): for inference
   (`chat`, `api`, `webchat`) LLaMA-Factory merges a single unquantized adapter with `merge_and_unload()`,
   which R-LoRA's per-token router forbids; an R-LoRA adapter is loaded unmerged instead.

Not patched, handled by the launcher: `export` of an R-LoRA adapter is refused before anything loads, and a
multi-process `train` runs `torchrun -m rlora_plugin.llamafactory` (LLaMA-Factory's own launcher re-executes
its own file under torchrun, where these patches would be missing). DeepSpeed (`deepspeed:` in the YAML) needs
no patch, on a CPU-only host either: accelerate 1.11, LLaMA-Factory 0.9.5's pin, gives a torchrun process group
`gloo` by itself (1.13 and later do so only with `cpu=True`, hence the Axolotl plugin's `cpu_distributed`).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path
from typing import Any

import rlora_plugin  # noqa: F401  (registers the RLORA PEFT type: building and loading need it)
from rlora_plugin.config import RLoraConfig, RLoraConfigError, rlora_fields
from rlora_plugin.layer import MERGE_WHY
from rlora_plugin.registration import PEFT_TYPE_NAME
from rlora_plugin.saved import saved_peft_type

CHECKED_VERSION = "0.9.5"
FINETUNING_TYPE = "rlora"
# The plain-LoRA fields of `RLoraConfig` -> the LLaMA-Factory key they come from (its own meaning and default).
LORA_KEYS = {
    "r": "lora_rank",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "use_rslora": "use_rslora",
    "target_modules": "lora_target",
    "modules_to_save": "additional_target",
}
# R-LoRA's settings as flat LLaMA-Factory keys: `rlora_<RLoraConfig field>`, plus the launcher's `rlora_metrics`.
RLORA_KEYS = {f"rlora_{name}": name for name in (*rlora_fields(), "init_seed")}
METRICS_KEY = "rlora_metrics"

_EXPORT_FIX = (
    "export it with frozen gates as a plain LoRA that merges exactly (`python -m rlora_plugin.export ADAPTER_DIR "
    "OUT_DIR --gates uniform`), then run `llamafactory-cli export` on OUT_DIR with `finetuning_type: lora`; "
    "or serve the R-LoRA adapter unmerged with `python -m rlora_plugin.llamafactory chat|api CONFIG.yaml`"
)
# LLaMA-Factory key -> (why, fix), refused when set to a truthy value with `finetuning_type: rlora`.
REFUSED = {
    "use_dora": (
        "DoRA is a variant of plain LoRA; R-LoRA has no magnitude vector",
        "remove `use_dora`, or use `finetuning_type: lora`",
    ),
    "pissa_init": (
        "PiSSA initializes plain LoRA from the base weights' SVD; R-LoRA has its own initialization",
        "remove `pissa_init` and choose `rlora_init` ('random' or 'zero')",
    ),
    "pissa_convert": ("there is no PiSSA adapter to convert", "remove `pissa_convert`"),
    "loraplus_lr_ratio": (
        "LLaMA-Factory's LoRA+ optimizer groups parameters by plain-LoRA names and was never checked with R-LoRA",
        "remove `loraplus_lr_ratio`",
    ),
    "create_new_adapter": (
        f"it merges the loaded adapter into the base model first; {MERGE_WHY}",
        "remove `create_new_adapter` (training from `adapter_name_or_path` continues that R-LoRA adapter)",
    ),
    "use_unsloth": (
        "Unsloth builds its own plain LoRA layers and would skip R-LoRA's",
        "remove `use_unsloth`",
    ),
    "use_kt": ("KTransformers builds its own plain LoRA config", "remove `use_kt`"),
}


class LlamaFactoryConfigError(ValueError):
    """A config the launcher refuses; the message names the key, the value and the fix."""


class _Run:
    """The R-LoRA settings of the config this process runs (None: not an `rlora` run)."""

    options: dict[str, Any] | None = None
    metrics: bool = True


def _refusal(key: str, value: Any, why: str, fix: str) -> LlamaFactoryConfigError:
    return LlamaFactoryConfigError(
        f"finetuning_type: {FINETUNING_TYPE} does not support `{key}: {value!r}`: {why}. Fix: {fix}."
    )


def lf_key(field_name: str) -> str:
    """The LLaMA-Factory key an `RLoraConfig` field is set with, for error messages."""
    return LORA_KEYS.get(field_name, f"rlora_{field_name}")


def _default(key: str) -> Any:
    """LLaMA-Factory's own default of one of its config keys (no defaults retyped here)."""
    from llamafactory.hparams import FinetuningArguments, TrainingArguments

    for cls in (FinetuningArguments, TrainingArguments):
        if key in cls.__dataclass_fields__:
            return cls.__dataclass_fields__[key].default
    raise KeyError(key)


def build_rlora_config(run: dict[str, Any], **lora: Any) -> RLoraConfig:
    """An `RLoraConfig` from LoRA fields and the run's R-LoRA settings; errors name the LLaMA-Factory key."""
    try:
        return RLoraConfig(**lora, **run)
    except RLoraConfigError as exc:
        raise LlamaFactoryConfigError(
            f"finetuning_type: {FINETUNING_TYPE}: invalid `{lf_key(exc.key)}: {exc.value!r}`: {exc.fix}"
        ) from exc


def translate(config: dict[str, Any]) -> dict[str, Any]:
    """Check an `rlora` config and return it as LLaMA-Factory's LoRA config without the `rlora_*` keys; the
    R-LoRA settings are kept for patch 2. Any other config is returned unchanged."""
    rlora_keys = sorted(k for k in config if k.startswith("rlora_"))
    if config.get("finetuning_type") != FINETUNING_TYPE:
        if rlora_keys:
            raise LlamaFactoryConfigError(
                f"`{rlora_keys[0]}` is an R-LoRA setting, but `finetuning_type` is "
                f"{config.get('finetuning_type', _default('finetuning_type'))!r}. Fix: set "
                f"`finetuning_type: {FINETUNING_TYPE}`, or remove the `rlora_*` keys."
            )
        return config
    known = [*RLORA_KEYS, METRICS_KEY]
    for key in rlora_keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"the R-LoRA keys are {', '.join(known)}"
            raise LlamaFactoryConfigError(
                f"finetuning_type: {FINETUNING_TYPE}: unknown key `{key}: {config[key]!r}`. Fix: {hint}"
            )
    for key, (why, fix) in REFUSED.items():
        if config.get(key):
            raise _refusal(key, config[key], why, fix)
    metrics = config.get(METRICS_KEY, True)
    if not isinstance(metrics, bool):
        raise LlamaFactoryConfigError(
            f"finetuning_type: {FINETUNING_TYPE}: invalid `{METRICS_KEY}: {metrics!r}`: use true or false."
        )
    run = {name: config[key] for key, name in RLORA_KEYS.items() if key in config}
    run.setdefault("init_seed", config.get("seed", _default("seed")))
    # The scalar LoRA keys (LLaMA-Factory's `lora_target`/`additional_target` are lists resolved at model load).
    lora = {
        name: config[key]
        for name, key in LORA_KEYS.items()
        if config.get(key) is not None and name in ("r", "lora_alpha", "lora_dropout", "use_rslora")
    }
    build_rlora_config(run, **lora)  # every value checked now, before anything loads
    checkpointing = _aux_loss_checkpointing(config) if run.get("router_aux_loss_coef", 0) > 0 else {}
    _Run.options, _Run.metrics = run, metrics
    rewritten = {**{k: v for k, v in config.items() if k not in rlora_keys}, "finetuning_type": "lora", **checkpointing}
    base = config.get("model_name_or_path")
    if base and Path(base).is_dir():  # the adapter records its base: absolute, so it loads from any directory
        rewritten["model_name_or_path"] = str(Path(base).resolve())
    return rewritten


def _aux_loss_checkpointing(config: dict[str, Any]) -> dict[str, Any]:
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
            raise _refusal(key, config[key], why, f"remove `{key}`, or set `rlora_router_aux_loss_coef: 0`")
    if "use_reentrant_gc" in config:
        return {}
    logging.getLogger("llamafactory.rlora_plugin").warning(
        "R-LoRA: `use_reentrant_gc` set to false: the load-balancing loss (rlora_router_aux_loss_coef) needs "
        "non-reentrant gradient checkpointing (LLaMA-Factory's default is reentrant)."
    )
    return {"use_reentrant_gc": False}


def _read_args(original):
    def read_args(args=None):
        config = original(args)
        if isinstance(config, dict):
            return translate(config)
        flags = [str(arg) for arg in config]  # `--key value` flags instead of a config file
        pairs = {*zip(flags, flags[1:], strict=False), *(tuple(f.split("=", 1)) for f in flags if "=" in f)}
        if ("--finetuning_type", FINETUNING_TYPE) in pairs or any(f.startswith("--rlora_") for f in flags):
            raise LlamaFactoryConfigError(
                f"finetuning_type: {FINETUNING_TYPE} is read from a YAML or JSON config only, not from "
                "command-line flags. Fix: write the settings into CONFIG.yaml and pass its path."
            )
        return config

    return read_args


def _lora_config(original):
    # What `_setup_lora_tuning` passes to LoraConfig in 0.9.5; anything else means its code changed.
    passed = {"task_type", "inference_mode", "use_dora", *LORA_KEYS}

    def lora_config(**kwargs):
        if _Run.options is None:
            return original(**kwargs)
        unknown = set(kwargs) - passed
        if unknown or kwargs.get("use_dora"):
            raise RuntimeError(
                f"rlora_plugin.llamafactory: LLaMA-Factory passed {sorted(unknown) or 'use_dora=True'} to "
                f"LoraConfig, which its version {CHECKED_VERSION} does not: this version is not supported."
            )
        kwargs.pop("use_dora", None)
        return build_rlora_config(_Run.options, **kwargs)

    return lora_config


def _hub_options(source: Any) -> dict[str, Any]:
    """The model-hub options LLaMA-Factory loads adapters with, from its `ModelArguments` or its config dict."""
    get = source.get if isinstance(source, dict) else lambda key, default=None: getattr(source, key, default)
    return {"cache_dir": get("cache_dir"), "revision": get("model_revision", "main"), "token": get("hf_hub_token")}


def _adapters(paths: Any, subfolder: str | None = None, **hub: Any) -> tuple[list[str], list[str]]:
    """`adapter_name_or_path` (a comma-separated string in the YAML, a list once parsed) and its R-LoRA ones,
    local directories or model-hub ids (their adapter_config.json decides, not the run's `finetuning_type`);
    more than one adapter with an R-LoRA one among them is refused (LLaMA-Factory merges all but the last)."""
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",")]
    paths = list(paths or [])
    rlora = [p for p in paths if saved_peft_type(p, subfolder, **hub) == PEFT_TYPE_NAME]
    if rlora and len(paths) > 1:
        raise LlamaFactoryConfigError(
            f"`adapter_name_or_path: {','.join(paths)}` stacks adapters, and LLaMA-Factory merges all but the "
            f"last one; {MERGE_WHY} ({rlora[0]}). Fix: give the R-LoRA adapter alone."
        )
    return paths, rlora


def _setup_lora_tuning(original):
    def setup(config, model, model_args, finetuning_args, is_trainable, cast_trainable_params_to_fp32):
        hub = _hub_options(model_args)
        _, rlora = _adapters(model_args.adapter_name_or_path, model_args.adapter_folder, **hub)
        if not rlora or is_trainable:  # training continues the adapter as LLaMA-Factory does (not merged)
            return original(config, model, model_args, finetuning_args, is_trainable, cast_trainable_params_to_fp32)
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            model, rlora[0], subfolder=model_args.adapter_folder, offload_folder=model_args.offload_folder, **hub
        )
        logging.getLogger("llamafactory.rlora_plugin").info(
            f"Loaded the R-LoRA adapter {rlora[0]} unmerged ({MERGE_WHY})."
        )
        return model

    return setup


# module, attribute, wrapper factory: every patch in one place (see the module docstring).
PATCHES = (
    ("llamafactory.hparams.parser", "read_args", _read_args),
    ("llamafactory.model.adapter", "LoraConfig", _lora_config),
    ("llamafactory.model.adapter", "_setup_lora_tuning", _setup_lora_tuning),
)
_patched: list[str] = []


def install_patches() -> None:
    """Patch LLaMA-Factory in this process (idempotent); refuse a version the patches were not checked with."""
    if _patched:
        return
    found = version("llamafactory")
    if found != CHECKED_VERSION:
        raise RuntimeError(
            f"rlora_plugin.llamafactory patches LLaMA-Factory internals checked against llamafactory "
            f"{CHECKED_VERSION} only, and {found} is installed. Fix: pip install llamafactory=={CHECKED_VERSION}."
        )
    for module_name, attribute, wrap in PATCHES:
        module = importlib.import_module(module_name)
        if not hasattr(module, attribute):
            raise RuntimeError(
                f"rlora_plugin.llamafactory: {module_name}.{attribute} is missing in llamafactory {found}; "
                f"the patches were checked against {CHECKED_VERSION}."
            )
        setattr(module, attribute, wrap(getattr(module, attribute)))
        _patched.append(f"{module_name}.{attribute}")


USAGE = """usage: rlora-llamafactory COMMAND CONFIG.yaml [key=value ...]   (python -m rlora_plugin.llamafactory)
  train     train, as llamafactory-cli train, with `finetuning_type: rlora` (multi-process: FORCE_TORCHRUN=1
            NPROC_PER_NODE=N, as llamafactory-cli; DeepSpeed with `deepspeed: ds_config.json` in the YAML)
  chat, api, webchat   as llamafactory-cli; an R-LoRA adapter in `adapter_name_or_path` loads unmerged
  export    refused for an R-LoRA adapter (it cannot be merged); see python -m rlora_plugin.export
Other commands are passed to llamafactory-cli unchanged."""


def _in_torchrun_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _torchrun(argv: list[str]) -> int:
    """Run this module under torchrun (LLaMA-Factory's launcher would run its own file there, unpatched),
    with the environment variables llamafactory-cli reads."""
    from llamafactory.extras.misc import find_available_port, get_device_count

    command = [
        "torchrun",
        f"--nnodes={os.getenv('NNODES', '1')}",
        f"--node_rank={os.getenv('NODE_RANK', '0')}",
        f"--nproc_per_node={os.getenv('NPROC_PER_NODE', str(get_device_count()))}",
        f"--master_addr={os.getenv('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={os.getenv('MASTER_PORT', str(find_available_port()))}",
        "-m",
        __name__,
        "train",
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None, callbacks: list[Any] = ()) -> int:
    """The command line; `callbacks` are extra TrainerCallbacks for `train`, as for LLaMA-Factory's `run_exp`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "help"
    if command in ("help", "-h", "--help"):
        print(USAGE)
        return 0
    install_patches()
    sys.argv = [sys.argv[0], *argv]  # LLaMA-Factory's entries read the config from sys.argv
    from llamafactory.hparams import parser

    try:
        if command in ("train", "chat", "api", "webchat", "export"):
            config = parser.read_args()  # checked and rewritten here, before anything loads
            if isinstance(config, dict):
                hub = _hub_options(config)
                _, rlora = _adapters(config.get("adapter_name_or_path"), config.get("adapter_folder"), **hub)
                if command == "export" and rlora:
                    raise LlamaFactoryConfigError(
                        f"export: `adapter_name_or_path: {config['adapter_name_or_path']!r}` holds an R-LoRA "
                        f"adapter ({rlora[0]}), and export merges it: {MERGE_WHY}. Fix: {_EXPORT_FIX}."
                    )
    except LlamaFactoryConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if command == "train":
        from llamafactory.extras.misc import get_device_count, is_env_enabled

        if not _in_torchrun_worker() and (is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1):
            return _torchrun(argv)
        from llamafactory.train.tuner import run_exp

        callbacks = list(callbacks)
        if _Run.options is not None and _Run.metrics:
            from rlora_plugin.callbacks import RLoraMetricsCallback

            callbacks.append(RLoraMetricsCallback(None, metrics=True))
        run_exp(callbacks=callbacks)
        return 0
    from llamafactory import launcher

    sys.argv = [sys.argv[0], command, *argv]
    launcher.launch()
    if command == "chat":
        _join_generation_threads()
    return 0


def _join_generation_threads(timeout: float = 60.0) -> None:
    """Let LLaMA-Factory's streaming generation threads end before the interpreter does: `chat` returns once
    the last token is printed, and a daemon thread still inside a torch op at interpreter shutdown aborts the
    process ("terminate called without an active exception", exit 134; about 1 run in 10 on a loaded machine
    with an unmerged adapter)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.endswith("(generate)"):
            thread.join(timeout)
