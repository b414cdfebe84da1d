"""`python -m rlora_plugin.llamafactory COMMAND CONFIG.yaml`: see rlora_plugin.llamafactory."""

import sys

from rlora_plugin.llamafactory.cli import main

sys.exit(main())
