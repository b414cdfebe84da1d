"""`python -m rlora_plugin.lm_eval [lm_eval's own arguments]`: lm-evaluation-harness's CLI with R-LoRA registered.

lm_eval loads an adapter with `--model hf --model_args pretrained=BASE,peft=ADAPTER` through
`PeftModel.from_pretrained`, which knows the `RLORA` PEFT type only once `rlora_plugin` is imported; lm_eval's
own `lm_eval` command never imports it. This module imports it and hands the arguments, unchanged, to lm_eval's
entry point, so every lm_eval option works as documented there.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

import rlora_plugin  # noqa: F401  (registers the RLORA PEFT type)

MODULE = "rlora_plugin.lm_eval"
CHECKED_VERSION = "0.4.11"  # Axolotl 0.19 and 0.21 pin it; tests/test_lm_eval.py runs it
INSTALL_FIX = f"pip install lm_eval=={CHECKED_VERSION}"


def command(base_model: str, adapter_dir: str, lm_eval_args: Sequence[str] = ()) -> str:
    """The shell command that evaluates the R-LoRA adapter in `adapter_dir` on `base_model`; `lm_eval_args` are
    further lm_eval options (`--tasks ...`)."""
    model_args = f"pretrained={base_model},peft={adapter_dir}"
    return shlex.join(["python", "-m", MODULE, "--model", "hf", "--model_args", model_args, *lm_eval_args])


def main() -> None:
    """Run lm_eval's CLI on `sys.argv[1:]`, as its `lm_eval` command would."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "lm_eval":
            raise
        raise SystemExit(
            f"python -m {MODULE} runs lm-evaluation-harness, which is not installed in {sys.prefix}. "
            f"Fix: `{INSTALL_FIX}` (the version rlora-plugin was tested with)."
        ) from exc
    cli_evaluate()


if __name__ == "__main__":
    main()
