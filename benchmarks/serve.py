"""Serving throughput: generated tokens per second and time to first token of vLLM with the base model, vLLM with
the frozen-gate export as a LoRA (`LoRARequest`), vLLM with the routed R-LoRA adapter (the plugin,
rlora_plugin.vllm_plugin) and PEFT `generate` with the routed adapter, at 1, 8 and 32 concurrent requests, on
SmolLM2-135M and a Qwen2.5-0.5B-shaped model. Runs in the vLLM venv (scripts/run-tests.sh vllm-0.32.0).

    python -m benchmarks.serve                        # both models, 3 rounds (about 40 min on 2 busy cores)
    python -m benchmarks.serve --models smollm2 --rounds 1 --out /tmp/serve   # a quick look

All four run side by side in one process (the three vLLM engines stay up; each round runs every variant at
every concurrency in turn, the order rotated every round), so load from other jobs hits them alike: every ratio
is the median over rounds of a paired ratio. `N` concurrent requests are `N` prompts submitted at once (vLLM
schedules them with continuous batching; PEFT decodes them as one batch). fp32, greedy, prompts of random token
ids, every reply exactly `--new-tokens` long (`ignore_eos`, `min_new_tokens`), eager mode (`enforce_eager`)
for every engine. The adapter: R-LoRA r=8, N=5 heads on gate_proj, up_proj, down_proj, random init with its
offset path, moved as if trained; its export with uniform gates is a LoRA of rank 16. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model

from benchmarks.generate import qwen25_05b_config
from benchmarks.speed.counts import MLP
from benchmarks.speed.report import RESULTS, machine
from benchmarks.tiny_assets import perturb
from examples import prepare_smollm2
from rlora_plugin import RLoraConfig
from rlora_plugin.export import export_lora
from rlora_plugin.vllm_plugin import hf_overrides

VARIANTS = {
    "base": "vLLM, base model",
    "export": "vLLM, frozen-gate export (LoRARequest)",
    "routed": "vLLM, routed R-LoRA (plugin)",
    "peft": "PEFT generate, routed R-LoRA",
    "hf_base": "transformers generate, base model",
}
MODELS = {"smollm2": "SmolLM2-135M", "qwen": "Qwen2.5-0.5B shape"}
# name: (numerator, denominator), the concurrencies with a target, the target (None: reported only)
RATIOS = {
    "routed / export": (("routed", "export"), (8, 32), 0.8),
    "routed / peft": (("routed", "peft"), (32,), 5.0),
    "routed / vLLM base": (("routed", "base"), (), None),  # what the plugin costs inside vLLM
    "peft / transformers base": (("peft", "hf_base"), (), None),  # what the adapter costs in PEFT
    "vLLM base / transformers base": (("base", "hf_base"), (), None),  # what vLLM gains by itself
}


def prepare(model: str, work: Path, smollm2_dir: Path | None) -> tuple[Path, Path, Path]:
    """The base model's directory, the R-LoRA adapter on it and its export with uniform gates."""
    base, adapter, export = work / model, work / f"{model}-rlora", work / f"{model}-export"
    if model == "qwen" and not (base / "config.json").exists():
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(qwen25_05b_config()).save_pretrained(base)
    elif model == "smollm2":
        base = smollm2_dir or base
        if not (base / "config.json").exists():
            prepare_smollm2.main(base)
    if not (export / "adapter_config.json").exists():
        config = RLoraConfig(target_modules=list(MLP), r=8, lora_alpha=16, num_heads=5)
        peft_model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), config)
        perturb(peft_model, seed=0)
        peft_model.save_pretrained(adapter)
        export_lora(adapter, export, "uniform")
    return base, adapter, export


def engines(base: Path, adapter: Path, export: Path) -> dict:
    from vllm import LLM

    common = dict(model=str(base), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=32,
                  kv_cache_memory_bytes=256 << 20, skip_tokenizer_init=True, disable_log_stats=False,
                  seed=0)  # fmt: skip
    return {
        "base": LLM(**common),
        "export": LLM(**common, enable_lora=True, max_lora_rank=16, max_loras=1),
        "routed": LLM(**common, hf_overrides=hf_overrides(str(adapter))),
    }


def run_vllm(llm, prompts: list[list[int]], new_tokens: int, lora) -> tuple[float, float]:  # noqa: ANN001
    """Wall time of the N requests submitted at once, and their median time to first token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora,
                           use_tqdm=False)  # fmt: skip
    wall = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return wall, statistics.median(o.metrics.first_token_latency for o in outputs)


@torch.no_grad()
def run_peft(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:  # noqa: ANN001
    """Wall time of one batch of the N prompts through `generate`, and the time to its first token (a
    `generate` of one token: the prefill)."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    wall = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return wall, first


def run_model(model: str, args: argparse.Namespace) -> dict:
    """{concurrency: {variant: {"tokens_per_s": [...per round], "ttft_s": [...]}}}"""
    from vllm.lora.request import LoRARequest

    base, adapter, export = prepare(model, args.work_dir, args.smollm2_dir)
    llms = engines(base, adapter, export)
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(adapter))
    peft_model.eval()
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab, (max(args.concurrency), args.prompt), generator=generator).tolist()
    lora = LoRARequest("export", 1, str(export))

    def measure(variant: str, n: int) -> tuple[float, float]:
        if variant == "peft":
            return run_peft(peft_model, prompts[:n], args.new_tokens)
        if variant == "hf_base":
            with peft_model.disable_adapter():
                return run_peft(peft_model, prompts[:n], args.new_tokens)
        return run_vllm(llms[variant], prompts[:n], args.new_tokens, lora if variant == "export" else None)

    keys = list(VARIANTS)
    results = {n: {v: {"tokens_per_s": [], "ttft_s": []} for v in keys} for n in args.concurrency}
    for n in args.concurrency:  # warm-up
        for variant in keys:
            measure(variant, n)
    for round_ in range(args.rounds):
        order = keys[round_ % len(keys) :] + keys[: round_ % len(keys)]
        for n in args.concurrency:
            for variant in order:
                wall, ttft = measure(variant, n)
                results[n][variant]["tokens_per_s"].append(n * args.new_tokens / wall)
                results[n][variant]["ttft_s"].append(ttft)
        print(f"{MODELS[model]}: round {round_ + 1}/{args.rounds} done", flush=True)
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()
    return results


def paired(results: dict, n: int, a: str, b: str, metric: str = "tokens_per_s") -> tuple[float, float, float]:
    """Median and range over rounds of `a`'s metric over `b`'s in the same round."""
    pairs = [x / y for x, y in zip(results[n][a][metric], results[n][b][metric], strict=True)]
    return statistics.median(pairs), min(pairs), max(pairs)


def tables(all_results: dict) -> list[str]:
    lines = ["## Throughput and time to first token (median over rounds)", "",
             "| model | concurrent requests | variant | generated tokens/s | time to first token, s |",
             "|---|---|---|---|---|"]  # fmt: skip
    for model, results in all_results.items():
        for n, variants in results.items():
            for variant, m in variants.items():
                speed, ttft = statistics.median(m["tokens_per_s"]), statistics.median(m["ttft_s"])
                lines.append(f"| {MODELS[model]} | {n} | {VARIANTS[variant]} | {speed:.1f} | {ttft:.3f} |")
    lines += ["", "## Paired throughput ratios (median over rounds, range in brackets) and the targets", "",
              "| model | concurrent requests | ratio | tokens/s ratio | target | met |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for model, results in all_results.items():
        for n in results:
            for name, ((a, b), at, target) in RATIOS.items():
                med, low, high = paired(results, n, a, b)
                goal = f">= {target:g}x" if n in at else "-"
                met = ("yes" if med >= target else "**no**") if n in at else "-"
                lines.append(f"| {MODELS[model]} | {n} | {name} | {med:.2f} ({low:.2f}-{high:.2f}) | {goal} | {met} |")
    return lines


def plot(all_results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4), squeeze=False)
    for ax, (model, results) in zip(axes[0], all_results.items(), strict=True):
        for variant, label in VARIANTS.items():
            ns = list(results)
            ax.plot(ns, [statistics.median(results[n][variant]["tokens_per_s"]) for n in ns], marker="o", label=label)
        ax.set(title=MODELS[model], xlabel="concurrent requests", ylabel="generated tokens/s", xscale="log")
        ax.set_xticks(list(results), [str(n) for n in results])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--smollm2-dir", type=Path, help="SmolLM2's converted weights (examples/prepare_smollm2.py)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rlora-serve"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # as vLLM's CPU worker runs on this machine (it reduces torch's threads to 1)
    import vllm

    started, load = time.time(), os.getloadavg()
    command = " ".join(["python -m benchmarks.serve", *(argv if argv is not None else sys.argv[1:])])
    all_results = {}
    for model in args.models:  # the results are written after each model
        all_results[model] = run_model(model, args)
        recorded = {key: value for key, value in vars(args).items() if not isinstance(value, Path)}
        (args.out / "serve.json").write_text(json.dumps({"args": recorded, "results": all_results}, indent=1))
        lines = [
            "# Serving throughput: vLLM with the base model, the export and the routed plugin, and PEFT generate",
            "",
            f"Generated by `{command}` in {(time.time() - started) / 60:.1f} min.",
            "",
            *machine(),
            f"- vllm {vllm.__version__}, fp32, eager mode, greedy; prompts of {args.prompt} random token ids, "
            f"{args.new_tokens} new tokens per request; {args.rounds} timed rounds after one warm-up round",
            f"- load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load)}, at end "
            f"{tuple(round(x, 2) for x in os.getloadavg())}",
            "",
            *tables(all_results),
            "",
        ]
        (args.out / "serve.md").write_text("\n".join(lines))
        plot(all_results, args.out / "serve.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
