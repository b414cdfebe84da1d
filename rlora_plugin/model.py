"""The R-LoRA tuner: finds the target `nn.Linear` layers and wraps them in `RLoraLinear`."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import RLoraConfig
from .layer import MERGE_REFUSAL, RLoraLayer, RLoraLinear


class RLoraModel(BaseTuner):
    """Creates an R-LoRA model (Liu et al., 2025) from a transformers model; use it through
    `peft.get_peft_model(model, RLoraConfig(...))` after `import rlora_plugin`.

    Targets default to PEFT's LoRA targets for the architecture.
    """

    prefix: str = "rlora_"
    tuner_layer_cls = RLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: RLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, RLoraLinear):
            target.update_layer(adapter_name, config, current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"R-LoRA can only adapt torch.nn.Linear layers, but target module '{current_key}' is a "
                f"{type(base).__module__}.{type(base).__name__}. Remove it from `target_modules` (or use "
                "'all-linear')."
            )
        new_module = RLoraLinear(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_REFUSAL)
