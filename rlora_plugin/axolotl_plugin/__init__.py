"""Axolotl integration: `plugins: [rlora_plugin.RLoraPlugin]` and `adapter: rlora`."""

from axolotl.utils.logging import get_logger

# Under "axolotl." so that Axolotl's log filter (`axolotl.logging_config.AxolotlOrWarnErrorFilter`, 0.19.0 and
# 0.21.0) shows its INFO records: it keeps only WARNING and above of loggers whose name does not start with
# "axolotl". Listed in docs/compatibility.md; tests/test_axolotl_couplings.py fails if the filter changes.
LOG = get_logger("axolotl.integrations.rlora_plugin")
