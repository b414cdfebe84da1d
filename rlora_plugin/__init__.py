"""R-LoRA (randomized multi-head LoRA) as a PEFT method, and an Axolotl plugin for it.

`import rlora_plugin` registers the `RLORA` PEFT type, so `get_peft_model` and
`PeftModel.from_pretrained` know it.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import RLoraConfig
from .layer import RLoraLayer, RLoraLinear
from .model import RLoraModel
from .registration import register_rlora

try:  # one source: pyproject.toml's version, as installed
    __version__ = version("rlora-plugin")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["RLoraConfig", "RLoraLayer", "RLoraLinear", "RLoraModel", "RLoraPlugin"]

register_rlora()


def __getattr__(name: str):
    """`RLoraPlugin` needs Axolotl, an optional dependency: import it only when asked for."""
    if name == "RLoraPlugin":
        from .axolotl_plugin.plugin import RLoraPlugin

        return RLoraPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
