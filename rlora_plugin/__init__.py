"""R-LoRA (randomized multi-head LoRA) as a PEFT method, and an Axolotl plugin for it.

`import rlora_plugin` registers the `RLORA` PEFT type, so `get_peft_model` and
`PeftModel.from_pretrained` know it.
"""

from .config import RLoraConfig
from .layer import RLoraLayer, RLoraLinear
from .model import RLoraModel
from .registration import register_rlora

__version__ = "0.1.0"
__all__ = ["RLoraConfig", "RLoraLayer", "RLoraLinear", "RLoraModel", "RLoraPlugin"]

register_rlora()


def __getattr__(name: str):
    """`RLoraPlugin` needs Axolotl, an optional dependency: import it only when asked for."""
    if name == "RLoraPlugin":
        from .axolotl_plugin.plugin import RLoraPlugin

        return RLoraPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
