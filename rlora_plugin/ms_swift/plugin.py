"""The file ms-swift imports for `--external_plugins "$(python -m rlora_plugin.ms_swift)"`: registers
`--tuner_type rlora` and `--callbacks rlora_metrics`, then checks the run's arguments before the model loads.
ms-swift imports it by path under a module name of its own, so imports here are absolute."""

from rlora_plugin.host import HostConfigError
from rlora_plugin.ms_swift.tuner import arguments_being_parsed, check_arguments, register

register()
if (args := arguments_being_parsed()) is not None:
    try:
        check_arguments(args)
    except HostConfigError as exc:
        raise SystemExit(f"error: {exc}") from None  # the message alone, no traceback through ms-swift
