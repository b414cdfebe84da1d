"""Export an R-LoRA adapter with its gates frozen to constants as a plain PEFT LoRA adapter (spec section 7).

    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates uniform
    python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates 0.1,0.3,0.2,0.2,0.2
    axolotl rlora-export ADAPTER_DIR OUT_DIR --gates uniform

A per-token router cannot be merged, but with constant gates `c_i` every layer's update is one fixed matrix
of rank at most 2r. The export writes it as a standard LoRA (`peft_type: LORA`, scaling 1): it loads without
`import rlora_plugin`, merges with `merge_and_unload()` or `axolotl merge-lora`, and can be served by any
engine that serves LoRA. It equals the R-LoRA model run with its gates fixed to the same constants; where the
trained router was not constant it differs from the routed model, so measure what freezing costs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .layer import adapter_scaling, frozen_gate_lora
from .saved import WEIGHTS, read_adapter

PREFIX = "base_model.model."  # how PEFT prefixes module names in a saved adapter


def parse_gates(text: str, num_heads: int) -> torch.Tensor:
    """`--gates`: 'uniform', or N comma-separated constants >= 0 that sum to 1 (a softmax's range)."""
    if text == "uniform":
        return torch.full((num_heads,), 1.0 / num_heads)
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = None
    fix = f"give 'uniform' or {num_heads} comma-separated numbers >= 0 that sum to 1, e.g. --gates uniform"
    if values is None or len(values) != num_heads:
        raise ValueError(f"--gates {text!r} is invalid for an adapter with {num_heads} heads: {fix}.")
    gates = torch.tensor(values)
    if (gates < 0).any() or abs(float(gates.sum()) - 1.0) > 1e-4:
        raise ValueError(f"--gates {text!r} is invalid: the gates must be >= 0 and sum to 1 ({fix}).")
    return gates


def export_lora(
    adapter_dir: str | Path, out_dir: str | Path, gates: str | torch.Tensor | dict[str, torch.Tensor]
) -> Path:
    """Write the plain LoRA of `adapter_dir` with frozen `gates` to `out_dir`: `--gates` text, one `(N,)` tensor
    for every layer, or one per module name as in the base model (e.g. `model.layers.0.mlp.up_proj`)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config, modules, others = read_adapter(adapter_dir)
    if isinstance(gates, str):
        gates = parse_gates(gates, config.num_heads)
    scaling = adapter_scaling(config)
    tensors, targets = {}, []
    for key, parts in modules.items():
        name = key.removeprefix(PREFIX)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlora_plugin.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="a saved R-LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out_dir", help="where to write the plain LoRA adapter")
    parser.add_argument("--gates", default="uniform", help="'uniform' (default) or N comma-separated constants")
    args = parser.parse_args(argv)
    try:
        out = export_lora(args.adapter_dir, args.out_dir, args.gates)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"plain LoRA (frozen gates {args.gates}) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
