"""A bitsandbytes-quantized base (`load_in_4bit` / `load_in_8bit`) under `adapter: rlora`.

Axolotl builds the `BitsAndBytesConfig` and applies PEFT's `prepare_model_for_kbit_training` only for
`adapter: lora/qlora` (`ModelLoader._set_quantization_config` and `_prepare_model_for_quantization`, both
run before any plugin hook can reach the loader's model kwargs). `patch_model_loader()`, installed from the
plugin's `register` hook, wraps those two methods: after Axolotl's own code, an rlora run gets the same
configuration Axolotl gives QLoRA (4-bit NF4, double quantization, compute dtype = the run's dtype,
`bnb_config_kwargs` applied on top) or LoRA-8bit (`load_in_8bit`), and the same kbit preparation (skipped
under ZeRO-3 and FSDP, as Axolotl skips it). R-LoRA then wraps the quantized `Linear4bit`/`Linear8bitLt`
layers (subclasses of `nn.Linear`): its layer calls the base layer and its init reads only the in/out sizes,
never the (packed) weights, so the adapted model still equals the base at init.

Checked on CPU with bitsandbytes 0.50.2 and torch 2.13 (no GPU needed): both layer types quantize, run
forward and backward, and train. The adapter reloads exactly onto a base loaded with `bnb_config` in the
run's dtype (`cfg.torch_dtype`, the `dtype` of the output's config.json): Axolotl sets float16 for
`load_in_8bit` without `bf16`, and casts the embeddings, norms and lm_head back to it after the kbit
preparation. (The 4-bit CPU packed-kernel switch that would break this is turned off in `layer.py`.)
"""

from __future__ import annotations

from typing import Any

from .args import ADAPTER_NAME
from .patching import wrap_once

CHECKED = "Axolotl 0.19.0 and 0.21.0"


def wants_kbit(cfg: Any) -> bool:
    return (cfg or {}).get("adapter") == ADAPTER_NAME and bool(
        (cfg or {}).get("load_in_4bit") or (cfg or {}).get("load_in_8bit")
    )


def bnb_config(cfg: Any):
    """The `BitsAndBytesConfig` Axolotl builds for `adapter: qlora` (4-bit) or `adapter: lora` (8-bit)."""
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        kwargs = {
            "load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_compute_dtype": cfg.torch_dtype or torch.float32,
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_quant_storage": torch.bfloat16,
        }
    else:
        kwargs = {"load_in_8bit": True}
    kwargs.update(cfg.bnb_config_kwargs or {})
    return BitsAndBytesConfig(**kwargs)


def patch_model_loader() -> None:
    """Wrap Axolotl's `ModelLoader` quantization steps for `adapter: rlora` (idempotent; no effect on others)."""
    from axolotl.loaders.model import ModelLoader

    def set_quantization_config(original):
        def _set_quantization_config(self):
            original(self)
            if wants_kbit(self.cfg) and "quantization_config" not in self.model_kwargs:
                # A checkpoint saved already quantized carries its own config, which transformers applies.
                if not getattr(self.model_config, "quantization_config", None):
                    self.model_kwargs["quantization_config"] = bnb_config(self.cfg)

        return _set_quantization_config

    def prepare_model_for_quantization(original):
        def _prepare_model_for_quantization(self):
            original(self)
            if not wants_kbit(self.cfg):
                return
            from peft import prepare_model_for_kbit_training
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
                return  # as Axolotl does for QLoRA: keep every dtype as loaded
            self.model = prepare_model_for_kbit_training(
                self.model, use_gradient_checkpointing=bool(self.cfg.gradient_checkpointing)
            )

        return _prepare_model_for_quantization

    wrap_once(ModelLoader, "_set_quantization_config", set_quantization_config, CHECKED)
    wrap_once(ModelLoader, "_prepare_model_for_quantization", prepare_model_for_quantization, CHECKED)
