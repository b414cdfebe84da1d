"""Drop other libraries' import-time log lines that do not apply to the run, before `import peft` emits them.

Each filter sits on the one logger that emits the line and matches the line's own words; everything else those
loggers say passes. Dropped:

- torch's deprecation of `register_constant()` on Enum classes, when torchao registers its own enums: addressed
  to torchao's developers, nothing a user can act on (always).
- torchao's failure to load its CUDA kernels (`_C_mxfp8`, `_C_cutlass_*`), when torch is a CPU-only build:
  they cannot apply (with a CUDA torch the line stays: it may matter there).

bitsandbytes' failure to fetch its CPU 4-bit kernel offline stays: it may matter to a 4-bit model on a CPU.
It runs on `import rlora_plugin` (the package's first import), so it helps where rlora_plugin is imported before
peft: its own `python -m` programs and scripts that import it first; under Axolotl's CLI these lines come out
before any plugin loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable


class DropRecords(logging.Filter):
    """Drop the records of one logger for which `matches(record)` holds."""

    def __init__(self, matches: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record)


def torchao_enum_deprecation(record: logging.LogRecord) -> bool:
    enum_class = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return str(record.msg).startswith("%s is an Enum subclass and is now natively supported by torch.compile") and (
        getattr(enum_class, "__module__", "").startswith("torchao")
    )


def torchao_cuda_kernels(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    kernels = ("/torchao/_C_mxfp8", "/torchao/_C_cutlass_")
    return message.startswith("Failed to load ") and any(kernel in message for kernel in kernels)


def quiet_import_noise() -> None:
    import torch

    filters = {"torch.utils._pytree": torchao_enum_deprecation}
    if torch.version.cuda is None and torch.version.hip is None:
        filters["torchao"] = torchao_cuda_kernels
    for name, matches in filters.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropRecords) and f.matches is matches for f in logger.filters):
            logger.addFilter(DropRecords(matches))
