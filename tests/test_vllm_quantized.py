"""The routed adapter served by the vLLM plugin on a quantized base: a tiny compressed-tensors int8 W8A8
checkpoint (int8 weights per output channel, inputs rounded to int8 per token at run time), made here by hand and
run by vLLM's CPU kernel (`CPUInt8ScaledMMLinearKernel`, oneDNN). The reference is PEFT's routed model on the same
base: the weights dequantized (`q * s`, fp32) in a linear layer that rounds its input to int8 per token as the
kernel does; PEFT keeps the offset path per token on it, as the plugin does on a quantized layer.

Runs only in the vLLM venv: `python -m pytest -m vllm tests/test_vllm_quantized.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_vllm import ALL_LINEAR, assert_same_replies, greedy, serve_jobs, tiny_base, vllm_job
from test_vllm_plugin import build, layer_outputs, vllm_process  # noqa: F401  (the fixture)
from tiny_models import perturb
from transformers import AutoModelForCausalLM

from benchmarks import tiny_assets
from rlora_plugin import RLoraConfig
from rlora_plugin.errors import ConfigError
from rlora_plugin.vllm_plugin import hf_overrides

pytestmark = pytest.mark.vllm

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The weights use int8's [-63, 63]: on a CPU without AVX512-VNNI (AVX2), vLLM's oneDNN int8 GEMM multiplies the
# inputs (shifted to uint8) by the weights in pairs summed in int16, which saturates beyond |w| = 64.
WEIGHT_BOUND = 63
W8A8 = {  # compressed-tensors' int8 W8A8: int8 weights per output channel, int8 inputs per token, dynamic
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True},
        }
    },
}  # fmt: skip


def int8_per_row(x: torch.Tensor, bound: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of `x` to `[-bound, bound]`: `q` (rounded half to even) and the
    scale `amax / bound`, in fp32."""
    scale = x.float().abs().amax(dim=-1, keepdim=True) / bound
    return (x.float() / scale).round().clamp(-bound, bound), scale


def w8a8_base(source: Path, quantized: Path, dequantized: Path) -> None:
    """`source` (an fp32 checkpoint) with its seven projections quantized to int8 per output channel: as a
    compressed-tensors W8A8 checkpoint in `quantized`, and dequantized (`q * s` in fp32) in `dequantized`."""
    weights = load_file(source / "model.safetensors")
    int8, plain = {}, {}
    for name, tensor in weights.items():
        module, _, kind = name.rpartition(".")
        if module.rpartition(".")[2] in LINEAR and kind == "weight":
            q, scale = int8_per_row(tensor, WEIGHT_BOUND)
            int8[name], int8[f"{module}.weight_scale"] = q.to(torch.int8), scale
            plain[name] = q * scale
        else:
            int8[name] = plain[name] = tensor.contiguous()
    for directory, state in ((quantized, int8), (dequantized, plain)):
        shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(config | {"quantization_config": W8A8}, indent=2))


class W8A8Linear(torch.nn.Linear):
    """The dequantized base's projection as vLLM's W8A8 kernel runs it: its input rounded to int8 per token
    (dynamic, symmetric), times the dequantized weight. Not a plain `nn.Linear`, so PEFT keeps the offset path per
    token on it, as on any quantized base."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = int8_per_row(x)
        return torch.nn.functional.linear((q * scale).to(x.dtype), self.weight, self.bias)


def as_w8a8(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in LINEAR and type(module) is torch.nn.Linear:
            module.__class__ = W8A8Linear
    return model


def dequantized_model(path: Path) -> torch.nn.Module:
    return as_w8a8(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)).eval()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict:
    """A tiny Llama as an int8 W8A8 checkpoint and dequantized, a random-init R-LoRA (offset path) on its seven
    projections trained on the dequantized one (moved as if trained), and 5 questions."""
    work = tmp_path_factory.mktemp("vllm_quantized")
    tokenizer = tiny_base("llama", work / "source")
    w8a8_base(work / "source", work / "int8", work / "dequantized")
    config = RLoraConfig(target_modules=ALL_LINEAR, r=4, lora_alpha=8, num_heads=3, lora_dropout=0.0)
    model = get_peft_model(dequantized_model(work / "dequantized"), config)
    perturb(model, seed=5)
    model.save_pretrained(work / "rlora")
    questions = dict.fromkeys(row["instruction"] for row in tiny_assets.alpaca_rows(16, seed=7))
    prompts = [tokenizer(question)["input_ids"] for question in questions]
    return dict(work=work, int8=work / "int8", dequantized=work / "dequantized", adapter=work / "rlora",
                prompts=prompts)  # fmt: skip


def test_routed_adapter_on_an_int8_w8a8_base(quantized):
    """Served by the plugin on the int8 W8A8 checkpoint (fp32 activations), the routed adapter replies to 5
    questions as PEFT's routed model on the same base, token for token, each chosen token's log-probability
    within 1e-4 (measured: 2.4e-6)."""
    reference = PeftModel.from_pretrained(dequantized_model(quantized["dequantized"]), quantized["adapter"]).eval()
    prompts = quantized["prompts"]
    expected = [greedy(reference, prompt, 16) for prompt in prompts]
    with reference.disable_adapter():
        unadapted = [greedy(reference, prompt, 16)["ids"] for prompt in prompts]
    job = vllm_job(quantized["int8"], prompts, 16, routed=quantized["adapter"])
    (served,) = serve_jobs(quantized["work"], [job])
    assert_same_replies(served, expected, unadapted)


@pytest.mark.usefixtures("vllm_process")
def test_the_offset_stays_columns_of_the_adapter_on_a_quantized_base(quantized):
    """The int8 weights are the checkpoint's (a quantized weight cannot absorb the offset exactly): each target's
    part holds the offset path, and each adapted layer (the fused `qkv_proj` and `gate_up_proj`, `o_proj`,
    `down_proj`), run by vLLM's int8 kernel, returns PEFT's output on the same base to fp32 rounding."""
    model = build(quantized["int8"], hf_overrides(str(quantized["adapter"])))
    checkpoint = load_file(quantized["int8"] / "model.safetensors")
    qkv = model.model.layers[1].self_attn.qkv_proj
    torch.testing.assert_close(qkv.weight.data, torch.cat([checkpoint[f"model.layers.1.self_attn.{n}_proj.weight"]
                                                           for n in "qkv"]), rtol=0, atol=0)  # fmt: skip
    parts = [part for m in model.modules() for part in getattr(m, "rlora_parts", [])]
    assert len(parts) == 2 * len(ALL_LINEAR) and all(part.offset_a is not None for part in parts)

    ours = build(quantized["int8"], hf_overrides(str(quantized["adapter"])), run=True).model.layers[1]
    peft = PeftModel.from_pretrained(dequantized_model(quantized["dequantized"]), quantized["adapter"]).eval()
    for name, got, want in layer_outputs(ours, peft.base_model.model.model.layers[1], torch.float32):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tensor parallel", r"`tensor_parallel_size: 2` is not tested with the routed adapter on a quantized base"),
        ("awq", r"`quantization: 'awq'` is not served: not tested with the routed adapter: vLLM's CPU build runs "
                r"4-bit AWQ and GPTQ weights only with its AVX512 kernels"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("vllm_process")
def test_what_it_cannot_serve_on_a_quantized_base_is_refused(quantized, tmp_path, case, message):
    """Refused at start-up, before the weights load; an AWQ config (the weights do not matter: refused first)."""
    base, engine = quantized["int8"], {}
    if case == "tensor parallel":
        engine = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
    elif case == "awq":
        base = tmp_path / "awq"
        shutil.copytree(quantized["dequantized"], base)
        config = json.loads((base / "config.json").read_text())
        awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
        (base / "config.json").write_text(json.dumps(config | {"quantization_config": awq}))
        engine = dict(dtype="float16")
    with pytest.raises(ConfigError, match=message):
        build(base, hf_overrides(str(quantized["adapter"])), **engine)


def test_a_quantization_scheme_not_tested_is_refused():
    """A layer quantized by another compressed-tensors scheme (here int4 weights, W4A16) is named."""
    from types import SimpleNamespace
    from unittest.mock import Mock

    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsLinearMethod,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16

    from rlora_plugin.vllm_plugin.model import RoutedAdapter

    scheme = CompressedTensorsWNA16(strategy="group", num_bits=4, group_size=32)
    layer = SimpleNamespace(quant_method=Mock(spec=CompressedTensorsLinearMethod), scheme=scheme)
    with pytest.raises(ConfigError, match=r"`model.layers.0.mlp.down_proj: 'CompressedTensorsWNA16'` is a "
                                          r"quantization of this adapted layer not tested"):  # fmt: skip
        RoutedAdapter.quantized(layer, "model.layers.0.mlp.down_proj")
