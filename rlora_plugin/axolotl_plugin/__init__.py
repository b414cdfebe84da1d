"""Axolotl integration: `plugins: [rlora_plugin.RLoraPlugin]` and `adapter: rlora`."""
