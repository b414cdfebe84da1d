"""Every example YAML passes Axolotl's validation with the R-LoRA plugin and builds the PEFT config it
promises. Model and dataset paths are pointed at the tiny local assets (no hub here); everything else is
validated as written, the GPU examples against a simulated bf16 GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from axolotl_validation import CPU, GPU, validated

from rlora_plugin.axolotl_plugin.args import build_rlora_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str, tiny: dict) -> dict:
    cfg = yaml.safe_load((EXAMPLES / name).read_text())
    cfg["base_model"] = str(tiny["model"])
    for dataset in cfg.setdefault("datasets", [{"type": "alpaca"}]):
        dataset["path"] = str(tiny["chat"] if dataset.get("type") == "chat_template" else tiny["alpaca"])
        dataset["ds_type"] = "json"
    return cfg


def test_cpu_example(tiny):
    cfg = validated(load_example("cpu-multitask.yml", tiny), CPU)
    peft = build_rlora_config(cfg)
    assert (peft.num_heads, peft.init, peft.head_dropout, peft.lora_dropout) == (5, "random", "per_head", 0.1)
    assert peft.target_modules == {"gate_proj", "up_proj", "down_proj"}
    assert not cfg.bf16 and not cfg.fp16


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-paper.yml", "qwen2.5-0.5b-zero2.yml", "qwen2.5-0.5b-zero3.yml"])
def test_paper_recipe(tiny, name):
    cfg = validated(load_example(name, tiny), GPU)
    peft = build_rlora_config(cfg)
    assert (peft.r, peft.lora_alpha, peft.num_heads, peft.lora_dropout, peft.use_rslora) == (4, 32, 5, 0.1, True)
    assert cfg.learning_rate == 2e-4 and cfg.lr_scheduler == "cosine" and cfg.sequence_len == 512
    assert cfg.micro_batch_size * cfg.gradient_accumulation_steps == 96
    if "zero" in name:
        stage = int(name[-5])
        config_file = Path(cfg.deepspeed) if Path(cfg.deepspeed).is_absolute() else EXAMPLES.parent / cfg.deepspeed
        assert json.loads(config_file.read_text())["zero_optimization"]["stage"] == stage


def test_reference_lists_every_rlora_key(tiny):
    from rlora_plugin.axolotl_plugin.args import RLoraOptions

    text = (EXAMPLES / "rlora-reference.yml").read_text()
    block = text.split("\nrlora:\n", 1)[1]
    listed = {line.strip().lstrip("# ").split(":")[0] for line in block.splitlines() if ":" in line}
    assert listed == set(RLoraOptions.model_fields)
    cfg = load_example("rlora-reference.yml", tiny)
    cfg.update(
        sequence_len=64, micro_batch_size=1, learning_rate=1e-3, output_dir="/tmp/unused", bf16=False, fp16=False,
    )  # fmt: skip
    peft = build_rlora_config(validated(cfg, CPU))
    assert (peft.num_heads, peft.init_gamma, peft.router_init, peft.router_temperature) == (5, 64, "zero", 1.0)
