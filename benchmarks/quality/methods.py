"""The methods compared, and the Axolotl YAML that trains each: the paper's ablation ladder from HydraLoRA
to R-LoRA (docs/method.md#hydralora-and-plain-lora-from-the-same-options), plus LoRA at the same rank and
at equal trainable parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    adapter: str | None  # None: the base model, not trained
    rlora: dict = field(default_factory=dict)  # the `rlora:` block for adapter: rlora
    equal_params: bool = False  # LoRA whose rank matches R-LoRA's trainable parameter count
    exported: bool = False  # also scored with its gates frozen as the export to a plain LoRA freezes them

    @property
    def multi_head(self) -> bool:
        return self.adapter == "rlora"


METHODS = {
    method.key: method
    for method in (
        Method("base", "base model (no training)", None),
        Method("lora", "LoRA, same r", "lora"),
        Method("lora_eq", "LoRA, equal params", "lora", equal_params=True),
        Method("hydralora", "HydraLoRA", "rlora", {"init": "zero", "head_dropout": "shared"}),
        # With the zero router above, every head gets the same gradient and HydraLoRA stays one LoRA; the
        # authors' code initializes the router like nn.Linear, which breaks that symmetry.
        Method(
            "hydralora_kaiming",
            "HydraLoRA, kaiming router",
            "rlora",
            {"init": "zero", "head_dropout": "shared", "router_init": "kaiming"},
        ),  # fmt: skip
        Method(
            "hydralora_mhd", "HydraLoRA + multi-head dropout", "rlora", {"init": "zero", "head_dropout": "per_head"}
        ),  # fmt: skip
        Method("hydralora_init", "HydraLoRA + random init", "rlora", {"init": "random", "head_dropout": "shared"}),
        # Frozen-gate scoring costs about as much decoding again as the run's own scoring: R-LoRA's only.
        Method("rlora", "R-LoRA", "rlora", {"init": "random", "head_dropout": "per_head"}, exported=True),
    )
}


def target_shapes(model_dir: Path) -> list[tuple[int, int]]:
    """(in_features, out_features) of every adapted linear layer, read from a weightless (meta) model."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [
        (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]


@dataclass(frozen=True)
class Recipe:
    """What every method shares: data, steps, schedule and adapter size."""

    model_dir: Path
    train_file: Path
    prepared_dir: Path
    r: int = 8
    heads: int = 5
    steps: int = 120
    micro_batch_size: int = 8
    sequence_len: int = 128


def training_config(method: Method, recipe: Recipe, rank: int, lr: float, seed: int, output_dir: Path) -> dict:
    """The Axolotl config of one run. `lora_alpha = 2 * rank` keeps the scaling s = alpha / r at 2 for every
    method, so a rank change does not change the effective learning rate."""
    cfg = {
        "base_model": str(recipe.model_dir),
        "special_tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "plugins": ["rlora_plugin.RLoraPlugin"],
        "adapter": method.adapter,
        "lora_r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.1,
        "lora_target_modules": list(TARGETS),
        # Axolotl auto-enables its Triton LoRA kernels for `adapter: lora`, which need CUDA: off on CPU.
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "datasets": [
            {"path": str(recipe.train_file), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}
        ],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(recipe.prepared_dir),
        "val_set_size": 0,
        "sequence_len": recipe.sequence_len,
        "sample_packing": False,
        "pad_to_multiple_of": 8,  # Axolotl's default pads every batch to 64 tokens; these items are 48-58
        "dataloader_num_workers": 0,
        "micro_batch_size": recipe.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": recipe.steps,
        "learning_rate": lr,
        "lr_scheduler": "cosine",
        "warmup_steps": max(1, recipe.steps // 10),
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "seed": seed,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": max(1, recipe.steps // 10),
        "save_strategy": "no",
        "output_dir": str(output_dir),
    }
    if method.multi_head:
        cfg["rlora"] = {"num_heads": recipe.heads, **method.rlora}
    return cfg
