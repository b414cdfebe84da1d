"""The errors rlora-plugin raises on purpose: one small tree, each naming what is at fault (`key`), its `value`,
and the `fix`, whichever host or engine raises it. Every message ends with ``Fix: <fix>.``.

    RLoraError                    key, value, fix
    ├── ConfigError (ValueError)  a setting refused: WHERE: `key: value` problem. Fix: fix.
    │   ├── RLoraConfigError      RLoraConfig's own validation (WHERE is "RLoraConfig")
    │   ├── HostConfigError       a host's config (WHERE is the line that selects R-LoRA: "adapter: rlora")
    │   └── InputError            data, not a setting: a row of a data file, a saved adapter's tensor
    └── HostChanged (RuntimeError)  a host no longer has what a patch or coupling relies on (patching.py)

`ConfigError` is a `ValueError`, so a pydantic validator turns it into a validation error and callers that catch
`ValueError` (PEFT, transformers) keep working; `HostChanged` is a `RuntimeError`. This module imports nothing of
the package, so every module can import it (config.py, host.py, layer.py, patching.py and the hosts).
"""

from __future__ import annotations

from typing import Any


class RLoraError(Exception):
    """An error of rlora-plugin: `key` (the setting, or the host attribute, at fault), its `value`, the `fix`."""

    def __init__(self, message: str, key: str, value: Any, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(message)


def _sentence(text: str) -> str:
    return f"{text.rstrip().rstrip('.')}."


class ConfigError(RLoraError, ValueError):
    """A setting that R-LoRA refuses: ``WHERE: `key: value` problem. Fix: fix.``"""

    def __init__(self, where: str, key: str, value: Any, problem: str, fix: str) -> None:
        self.where, self.problem = where, problem
        message = f"{where}: `{key}: {self.shown(value)}` {problem}. Fix: {_sentence(fix)}"
        super().__init__(message, key, value, fix)

    @staticmethod
    def shown(value: Any) -> str:
        """`value` as the message shows it."""
        return repr(value)


class RLoraConfigError(ConfigError):
    """A bad `RLoraConfig` value. `key` is the field name, so a host can name its own config key instead."""

    def __init__(self, key: str, value: Any, fix: str, problem: str = "is invalid") -> None:
        super().__init__("RLoraConfig", key, value, problem, fix)


class HostConfigError(ConfigError):
    """A host config that R-LoRA refuses; `where` is the host's selector (`adapter: rlora`), `key` its own key."""


class InputError(ConfigError):
    """Data that R-LoRA refuses, not a setting: a row of a data file (WHERE: the file and line, `key`: the field)
    or a saved adapter's tensor (WHERE: the adapter and its file or layer, `key`: the tensor). A long value is
    cut in the message, a tensor shown by its shape and dtype; `value` keeps it whole."""

    @staticmethod
    def shown(value: Any, limit: int = 80) -> str:
        if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor (errors.py imports no torch)
            return f"a tensor of shape {tuple(value.shape)}, {value.dtype}"
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."


DEFAULT_FIX = (
    "Install one of the checked versions, or report this at rlora-plugin with the versions you use "
    "(docs/compatibility.md lists every coupling to a host)."
)


class HostChanged(RLoraError, RuntimeError):
    """A host no longer has what a patch or coupling of rlora-plugin relies on. `checked`: a
    `patching.Checked` (the host package and the versions the coupling was checked with); `key` is what is
    needed, `value` the installed host version."""

    def __init__(self, checked: Any, needs: str, fix: str = DEFAULT_FIX) -> None:
        installed = f"{checked.package} {checked.installed()}"
        super().__init__(
            f"rlora-plugin needs {needs}, which {installed} does not provide (checked with {checked.package} "
            f"{checked.versions}). Fix: {_sentence(fix)}",
            needs,
            installed,
            fix,
        )
