"""Export an R-LoRA adapter with its gates frozen to constants as a plain PEFT LoRA adapter, with a model card
(docs/method.md#frozen-gates-the-export-to-a-plain-lora).

    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates uniform
    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates 0.1,0.3,0.2,0.2,0.2
    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates mean --data task.jsonl [--base-model DIR]
    axolotl rlora-export ADAPTER_DIR OUT_DIR --gates mean --data task.jsonl

A per-token router cannot be merged, but with constant gates `c_i` every layer's update is one fixed matrix
of rank at most 2r. The export writes it as a standard LoRA (`peft_type: LORA`, scaling 1): it loads without
`import rlora_plugin`, merges with `merge_and_unload()` or `axolotl merge-lora`, and can be served by any
engine that serves LoRA; its card (README.md) says so, and its target modules are listed in depth order. It
equals the R-LoRA model run with its gates fixed to the same constants; where the trained router was not
constant it differs from the routed model, so measure what freezing costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, InputError
from .layer import adapter_scaling, frozen_gate_lora
from .model_card import write_export_card
from .routing import PEFT_PREFIX, parse_gates, record_gates
from .saved import CONFIG, WEIGHTS, module_order, read_adapter, read_config

FORMATS = (
    "give every row a `prompt` (the user's turn, as in examples/multitask_data.py's test.jsonl), `messages` (chat "
    "turns with `role` and `content`, as in its train.jsonl) or `instruction` with an optional `input` (alpaca)"
)
WHERE = "rlora_plugin.export"  # what starts the message of a refused argument
PROGRESS_STEPS = 10  # progress lines on stderr per pass over the prompts


def chat_turns(turns: Any, where: str, key: str) -> list[dict]:
    """The turns before the last assistant turn (all of them without one): the prompt of a chat row."""
    if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and {"role", "content"} <= t.keys()
                                                      for t in turns)):  # fmt: skip
        raise InputError(
            where,
            key,
            turns,
            "is not a list of turns with `role` and `content`",
            'write the turns as [{"role": "user", "content": "..."}, ...] (sharegpt `from`/`value` turns are not read)',
        )
    last = max((i for i, turn in enumerate(turns) if turn["role"] == "assistant"), default=len(turns))
    if last == 0:
        raise InputError(where, key, turns, "starts with the assistant's turn, so no prompt precedes it", FORMATS)
    return turns[:last]


def row_prompt(row: Any, where: str) -> str | list[dict]:
    """One row's prompt: alpaca text as it is, or chat turns for the tokenizer's chat template (a `prompt` text is
    the user's turn, as examples/evaluate.py prompts the model)."""
    if not isinstance(row, dict):
        raise InputError(where, "row", row, "is not a JSON object", FORMATS)
    for key in ("messages", "conversations"):
        if key in row:
            return chat_turns(row[key], where, key)
    if "instruction" in row:
        parts = (row["instruction"], row.get("input") or "")
        if not all(isinstance(part, str) for part in parts) or not any(part.strip() for part in parts):
            raise InputError(
                where,
                "instruction",
                parts[0],
                f"with `input: {parts[1]!r}` gives no prompt text",
                "give a non-empty text in `instruction` (and optionally `input`)",
            )
        return "\n\n".join(part for part in parts if part)
    if "prompt" in row:
        if isinstance(row["prompt"], str) and row["prompt"].strip():
            return [{"role": "user", "content": row["prompt"]}]
        raise InputError(where, "prompt", row["prompt"], "is not a text", "give the user's turn as text")
    raise InputError(where, "fields", sorted(row), "include no prompt field", FORMATS)


def read_prompts(data_file: str | Path) -> list[str | list[dict]]:
    """Every row's prompt (`row_prompt`), all checked before a model loads: a bad row found after loading a model
    costs minutes."""
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file. Fix: give a jsonl file of prompts, one row a line")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                where, "row", line, f"is not JSON ({exc.msg})", "write one JSON object per line (jsonl)"
            ) from None
        prompts.append(row_prompt(row, where))
    if not prompts:
        raise ConfigError(WHERE, "--data", str(path), "holds no rows", FORMATS)
    return prompts


def templated(prompts: list[str | list[dict]], tokenizer, data_file: str | Path) -> list[str]:  # noqa: ANN001
    """The prompt texts: chat turns in the tokenizer's chat template, with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None) and any(isinstance(p, list) for p in prompts):
        raise ConfigError(
            WHERE,
            "--data",
            str(data_file),
            f"holds chat rows (`messages` or `prompt`), which need a chat template, and the tokenizer "
            f"{tokenizer.name_or_path!r} has none",
            "use a base model whose tokenizer has one, or alpaca rows",
        )
    return [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def prompts_of(data_file: str | Path, tokenizer) -> list[str]:  # noqa: ANN001
    """The prompts of a jsonl dataset (`read_prompts`) as the model reads them (`templated`)."""
    return templated(read_prompts(data_file), tokenizer, data_file)


def mean_gates(
    adapter_dir: str | Path, data_file: str | Path, base_model: str | None = None, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Each layer's mean gate over the real tokens of the prompts in `data_file`, with the adapter on its base
    model (`base_model`, or the one the adapter records); one task's prompts give a per-task LoRA. The file is
    checked before the model loads."""
    prompts = read_prompts(data_file)
    given, base_model = base_model, base_model or read_config(adapter_dir).base_model_name_or_path
    if not base_model:
        raise ConfigError(
            WHERE,
            "--base-model",
            given,
            f"is needed: {Path(adapter_dir) / CONFIG} records no base model (`base_model_name_or_path`)",
            "pass --base-model with the base model the adapter was trained on",
        )
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = templated(prompts, tokenizer, data_file)
    print(f"mean gates: {len(texts)} prompts of {data_file}, loading {base_model} with {adapter_dir}", file=sys.stderr)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(adapter_dir))
    return mean_gates_of(model, tokenizer, texts, batch_size)


def loaded_mean_gates(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    data_file: str | Path,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """`mean_gates` on a model already loaded with its adapter (left in eval mode)."""
    return mean_gates_of(model, tokenizer, prompts_of(data_file, tokenizer), batch_size)


def mean_gates_of(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    prompts: list[str],
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """The mean gates over `prompts`, with a progress line on stderr every tenth of them (a pass over a training
    set can take minutes on a CPU). Batches are padded on the right whatever the tokenizer's side, so every real
    token keeps the position it has alone."""
    start, reported = time.monotonic(), 0
    with torch.no_grad(), record_gates(model.eval()) as record:
        for first in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[first : first + batch_size], return_tensors="pt", padding=True,
                              padding_side="right")  # fmt: skip
            model(**batch)
            done = min(first + batch_size, len(prompts))
            if done * PROGRESS_STEPS // len(prompts) > reported:
                reported = done * PROGRESS_STEPS // len(prompts)
                print(f"mean gates: {done}/{len(prompts)} prompts ({100 * done // len(prompts)}%), "
                      f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    return record.mean()


def export_lora(
    adapter_dir: str | Path, out_dir: str | Path, gates: str | torch.Tensor | dict[str, torch.Tensor]
) -> Path:
    """Write the plain LoRA of `adapter_dir` with frozen `gates` to `out_dir`: `--gates` text, one `(N,)` tensor
    for every layer, or one per module name as in the base model (e.g. `model.layers.0.mlp.up_proj`)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config, modules, others = read_adapter(adapter_dir)
    described = describe_gates(gates)
    if not isinstance(gates, dict):
        gates = parse_gates(gates, config.num_heads)
    scaling = adapter_scaling(config)
    tensors, targets = {}, []
    for key, parts in modules.items():
        name = key.removeprefix(PEFT_PREFIX)
        layer_gates = gates[name] if isinstance(gates, dict) else gates
        lora_a, lora_b = frozen_gate_lora(
            parts["A"], parts["B"], layer_gates.float(), scaling, parts.get("offset_A"), parts.get("offset_B")
        )
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = lora_a, lora_b
        targets.append(name)
    rank = next(iter(tensors.values())).shape[0]
    targets.sort(key=module_order)
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: s is folded into B'
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=config.modules_to_save,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
    )
    lora.target_modules = targets  # LoraConfig made a set of them, which it would save in hash order
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in {**tensors, **others}.items()}, out_dir / WEIGHTS)
    write_export_card(out_dir, str(adapter_dir), described, targets)
    return out_dir


def describe_gates(gates: str | torch.Tensor | dict[str, torch.Tensor]) -> str:
    """The frozen gates in words, for the export's card."""
    if isinstance(gates, dict):
        return "constants of its own for each layer (e.g. `--gates mean`: the mean gates over a dataset)"
    if isinstance(gates, torch.Tensor):
        gates = ",".join(f"{float(g):g}" for g in gates)
    return f"`{gates}`"


def resolve_gates(
    adapter_dir: str | Path, gates: str, data: str | None = None, base_model: str | None = None
) -> str | dict[str, torch.Tensor]:
    """`--gates mean` needs `--data`, and only it takes `--data`."""
    if gates == "mean" and data is None:
        raise ConfigError(
            WHERE,
            "--data",
            data,
            "is needed by --gates mean (the prompts to average the gates over)",
            "pass --data FILE, a jsonl file of prompts, or choose other --gates",
        )
    if gates != "mean" and data is not None:
        raise ConfigError(
            WHERE,
            "--data",
            data,
            f"is used only with --gates mean, not with --gates {gates!r}",
            "leave --data out, or pass --gates mean",
        )
    return mean_gates(adapter_dir, data, base_model) if gates == "mean" else gates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora_plugin.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="a saved R-LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", help="where to write the plain LoRA adapter")
    parser.add_argument(
        "--gates", default="uniform", help="'uniform' (default), 'mean' (with --data) or N comma-separated constants"
    )
    parser.add_argument(
        "--data", help="with --gates mean: a jsonl file of prompts (rows with `prompt`, chat `messages` or alpaca)"
    )
    parser.add_argument("--base-model", help="with --gates mean: the base model (default: the adapter's record)")
    args = parser.parse_args(argv)
    try:
        out = export_lora(
            args.adapter_dir, args.out_dir, resolve_gates(args.adapter_dir, args.gates, args.data, args.base_model)
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"plain LoRA (frozen gates {args.gates}) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
