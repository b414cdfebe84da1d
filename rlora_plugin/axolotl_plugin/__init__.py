"""Axolotl integration: `plugins: [rlora_plugin.RLoraPlugin]` and `adapter: rlora`."""

from axolotl.utils.logging import get_logger

# Under "axolotl." so that Axolotl's log filter shows INFO records (it keeps only WARNING+ of other loggers).
LOG = get_logger("axolotl.integrations.rlora_plugin")
