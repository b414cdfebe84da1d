"""R-LoRA in ms-swift 4.6: `swift sft --tuner_type rlora`, through ms-swift's own plugin route.

ms-swift loads a tuner from a file given as `--external_plugins FILE`; this package ships that file, and
`python -m rlora_plugin.ms_swift` prints its path:

    swift sft --tuner_type rlora --external_plugins "$(python -m rlora_plugin.ms_swift)" \
        --lora_rank 8 --lora_alpha 16 --model_kwargs '{"rlora_num_heads": 5}' ...

The host itself is `tuner.py`; importing this package imports nothing of ms-swift.
"""

from pathlib import Path

PLUGIN = str(Path(__file__).with_name("plugin.py"))
