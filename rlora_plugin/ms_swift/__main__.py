"""`python -m rlora_plugin.ms_swift`: the path to give ms-swift's `--external_plugins`."""

from rlora_plugin.ms_swift import PLUGIN

print(PLUGIN)
