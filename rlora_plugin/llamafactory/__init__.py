"""R-LoRA as a LLaMA-Factory fine-tuning type, through a launcher (LLaMA-Factory has no plugin mechanism).

    python -m rlora_plugin.llamafactory train CONFIG.yaml     (or: rlora-llamafactory train CONFIG.yaml)
    python -m rlora_plugin.llamafactory chat CONFIG.yaml      (also api, webchat; export is refused)

The YAML is an ordinary LLaMA-Factory config with `finetuning_type: rlora`. LLaMA-Factory's LoRA keys keep
their meaning (`lora_rank`, `lora_alpha`, `lora_dropout`, `lora_target`, `use_rslora`, `additional_target`);
R-LoRA's own settings are flat `rlora_<field>` keys, one per R-LoRA field of `RLoraConfig` (`Source.RLORA`,
and `rlora_init_seed`, whose default is the run's `seed`), plus `rlora_metrics`. Everything is checked when
the config is read, before any model or dataset loads.

- `translate.py`: the config, checked and rewritten to LLaMA-Factory's LoRA path (a pure function);
- `patches.py`: the four patches of LLaMA-Factory's internals, listed there with the version they were
  checked against;
- `cli.py`: the command line. Not patched but handled there: `export` of an R-LoRA adapter is refused before
  anything loads, and a multi-process `train` runs `torchrun -m rlora_plugin.llamafactory` (LLaMA-Factory's
  own launcher re-executes its own file under torchrun, where the patches would be missing). DeepSpeed
  (`deepspeed:` in the YAML) needs no patch, on a CPU-only host either: accelerate 1.11, LLaMA-Factory
  0.9.5's pin, gives a torchrun process group `gloo` by itself (1.13 and later do so only with `cpu=True`,
  hence the Axolotl tests' `tests/cpu_distributed.py`).
"""

from .cli import main

__all__ = ["main"]
