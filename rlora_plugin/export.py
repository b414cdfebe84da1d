"""Export an R-LoRA adapter with its gates frozen to constants as a plain PEFT LoRA adapter
(docs/method.md#frozen-gates-the-export-to-a-plain-lora).

    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates uniform
    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates 0.1,0.3,0.2,0.2,0.2
    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates mean --data task.jsonl [--base-model DIR]
    axolotl rlora-export ADAPTER_DIR OUT_DIR --gates mean --data task.jsonl

A per-token router cannot be merged, but with constant gates `c_i` every layer's update is one fixed matrix
of rank at most 2r. The export writes it as a standard LoRA (`peft_type: LORA`, scaling 1): it loads without
`import rlora_plugin`, merges with `merge_and_unload()` or `axolotl merge-lora`, and can be served by any
engine that serves LoRA. It equals the R-LoRA model run with its gates fixed to the same constants; where the
trained router was not constant it differs from the routed model, so measure what freezing costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .layer import adapter_scaling, frozen_gate_lora
from .routing import PEFT_PREFIX, parse_gates, record_gates
from .saved import WEIGHTS, read_adapter, read_config


def prompts_of(data_file: str | Path, tokenizer) -> list[str]:  # noqa: ANN001
    """The prompts of a jsonl dataset: chat rows (`messages`, as in the example; everything before the last
    assistant turn, in the tokenizer's chat template) or alpaca rows (`instruction` and `input`)."""
    prompts = []
    for number, line in enumerate(Path(data_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row or "conversations" in row:
            messages = row.get("messages") or row["conversations"]
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
            prompts.append(tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True))
        elif "instruction" in row:
            prompts.append("\n\n".join(p for p in (row["instruction"], row.get("input")) if p))
        else:
            raise ValueError(
                f"{data_file}, line {number}: no `messages` (chat) or `instruction` (alpaca) field; --data needs "
                "a jsonl file in one of those formats."
            )
    if not prompts:
        raise ValueError(f"{data_file} holds no prompts.")
    return prompts


def mean_gates(
    adapter_dir: str | Path, data_file: str | Path, base_model: str | None = None, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Each layer's mean gate over the real tokens of the prompts in `data_file`, with the adapter on its base
    model (`base_model`, or the one the adapter records); one task's prompts give a per-task LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model = base_model or read_config(adapter_dir).base_model_name_or_path
    if not base_model:
        raise ValueError(f"{adapter_dir} records no base model: pass --base-model.")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(adapter_dir))
    return loaded_mean_gates(model, tokenizer, data_file, batch_size)


def loaded_mean_gates(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    data_file: str | Path,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """`mean_gates` on a model already loaded with its adapter (left in eval mode). Batches are padded on the
    right whatever the tokenizer's side, so every real token keeps the position it has alone."""
    prompts = prompts_of(data_file, tokenizer)
    with torch.no_grad(), record_gates(model.eval()) as record:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                              padding_side="right")  # fmt: skip
            model(**batch)
    return record.mean()


def export_lora(
    adapter_dir: str | Path, out_dir: str | Path, gates: str | torch.Tensor | dict[str, torch.Tensor]
) -> Path:
    """Write the plain LoRA of `adapter_dir` with frozen `gates` to `out_dir`: `--gates` text, one `(N,)` tensor
    for every layer, or one per module name as in the base model (e.g. `model.layers.0.mlp.up_proj`)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config, modules, others = read_adapter(adapter_dir)
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
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: s is folded into B'
        lora_dropout=0.0,
        target_modules=sorted(targets),
        modules_to_save=config.modules_to_save,
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in {**tensors, **others}.items()}, out_dir / WEIGHTS)
    return out_dir


def resolve_gates(
    adapter_dir: str | Path, gates: str, data: str | None = None, base_model: str | None = None
) -> str | dict[str, torch.Tensor]:
    """`--gates mean` needs `--data`, and only it takes `--data`."""
    if (gates == "mean") != (data is not None):
        raise ValueError(
            "--gates mean needs --data FILE (the prompts to average the gates over), and --data is "
            f"used only with --gates mean (got --gates {gates!r}, --data {data!r})."
        )
    return mean_gates(adapter_dir, data, base_model) if gates == "mean" else gates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora_plugin.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="a saved R-LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", help="where to write the plain LoRA adapter")
    parser.add_argument(
        "--gates", default="uniform", help="'uniform' (default), 'mean' (with --data) or N comma-separated constants"
    )
    parser.add_argument("--data", help="with --gates mean: a jsonl dataset (chat `messages` or alpaca rows)")
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
