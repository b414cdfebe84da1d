"""A bitsandbytes-quantized base (`load_in_4bit` / `load_in_8bit`) under `adapter: rlora`, quantized by Axolotl's
own code.

Axolotl builds the `BitsAndBytesConfig` and applies PEFT's `prepare_model_for_kbit_training` only for the
adapters it knows (`ModelLoader._set_quantization_config` and `_prepare_model_for_quantization` read
`cfg.adapter`; both run before any plugin hook can reach the loader's model kwargs). `patch_model_loader()`,
installed from the plugin's `register` hook, wraps those two methods so that, for their duration, an rlora run
is presented to them as the adapter Axolotl quantizes for: `qlora` with `load_in_4bit`, `lora` with
`load_in_8bit`. It so gets exactly the configuration and the preparation Axolotl gives QLoRA or LoRA-8bit,
architecture special cases included (jamba's, qwen2_moe's and nemotron_h's 4-bit quant storage, falcon_h1's
and jamba's skipped modules, `bnb_config_kwargs` for 4-bit, the skips under ZeRO-3 and FSDP), in every
Axolotl version, without a copy that drifts. R-LoRA then wraps the quantized `Linear4bit`/`Linear8bitLt`
layers (subclasses of `nn.Linear`): its layer calls the base layer and its init reads only the in/out sizes,
never the (packed) weights, so the adapted model still equals the base at init.

Checked on CPU with bitsandbytes 0.50.2 and torch 2.13 (no GPU needed): both layer types quantize, run
forward and backward, and train. The run records its `quantization_config` and dtype (`cfg.torch_dtype`) in
the output's config.json, and the adapter reloads exactly onto a base loaded with both: Axolotl sets float16
for `load_in_8bit` without `bf16`, and casts the embeddings, norms and lm_head back to it after the kbit
preparation. (The 4-bit CPU packed-kernel switch that would break this is turned off in `layer.py`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rlora_plugin.patching import Checked, HostChanged, wrap_once

from . import LOG
from .args import ADAPTER_NAME

CHECKED = Checked("axolotl", "0.19.0 and 0.21.0")


def wants_kbit(cfg: Any) -> bool:
    return (cfg or {}).get("adapter") == ADAPTER_NAME and bool(
        (cfg or {}).get("load_in_4bit") or (cfg or {}).get("load_in_8bit")
    )


def quantized_as(cfg: Any) -> str:
    """The adapter Axolotl builds this quantization for: QLoRA for 4 bits, LoRA for 8 (config validation
    refuses both at once)."""
    return "qlora" if cfg.load_in_4bit else "lora"


@contextmanager
def presented_as_quantized_lora(cfg: Any) -> Iterator[None]:
    """`cfg.adapter` reads `qlora`/`lora` inside the block, and `rlora` again after it, whatever happens."""
    cfg.adapter = quantized_as(cfg)
    try:
        yield
    finally:
        cfg.adapter = ADAPTER_NAME


def patch_model_loader() -> None:
    """Wrap Axolotl's `ModelLoader` quantization steps for `adapter: rlora` (idempotent; no effect on others)."""
    from axolotl.loaders.model import ModelLoader

    def set_quantization_config(original):
        def _set_quantization_config(self):
            if not wants_kbit(self.cfg):
                return original(self)
            if self.cfg.load_in_8bit and self.cfg.bnb_config_kwargs:
                LOG.warning(
                    "R-LoRA: `bnb_config_kwargs` is ignored with `load_in_8bit`: Axolotl applies it to its 4-bit "
                    "(QLoRA) config only, for `adapter: lora` as well"
                )
            with presented_as_quantized_lora(self.cfg):
                original(self)
            if "quantization_config" not in self.model_kwargs:
                raise HostChanged(
                    CHECKED,
                    f"`ModelLoader._set_quantization_config` to build the bitsandbytes config for `adapter: "
                    f"{quantized_as(self.cfg)}` with `load_in_{4 if self.cfg.load_in_4bit else 8}bit` (it built none)",
                )

        return _set_quantization_config

    def prepare_model_for_quantization(original):
        def _prepare_model_for_quantization(self):
            if not wants_kbit(self.cfg):
                return original(self)
            with presented_as_quantized_lora(self.cfg):
                original(self)

        return _prepare_model_for_quantization

    wrap_once(ModelLoader, "_set_quantization_config", set_quantization_config, CHECKED)
    wrap_once(ModelLoader, "_prepare_model_for_quantization", prepare_model_for_quantization, CHECKED)
