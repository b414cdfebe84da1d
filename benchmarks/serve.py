"""Serving throughput: generated tokens per second and time to first token of vLLM with the base model, vLLM with
the frozen-gate export as a LoRA (`LoRARequest`), vLLM with the routed R-LoRA adapter (the plugin,
rlora_plugin.vllm_plugin) and PEFT `generate` with the routed adapter, at 1, 8 and 32 concurrent requests, on
SmolLM2-135M and a Qwen2.5-0.5B-shaped model, in fp32 or bf16, with tensor parallelism 1 or 2. Runs in the vLLM
venv (scripts/run-tests.sh vllm-0.32.0).

    python -m benchmarks.serve --dtype float32                    # -> results/serve-float32-tp1.md
    python -m benchmarks.serve --dtype bfloat16                   # -> results/serve-bfloat16-tp1.md
    python -m benchmarks.serve --dtype float32 --tensor-parallel-size 2   # Qwen shape; serve-float32-tp2.md
    python -m benchmarks.serve --dtype bfloat16 --tensor-parallel-size 2  # Qwen shape; serve-bfloat16-tp2.md
    python -m benchmarks.serve --dtype float32 --profile 32       # where the routed engine's time goes
    python -m benchmarks.serve --models smollm2 --rounds 1 --concurrency 1 --new-tokens 4 --out /tmp/serve  # smoke

All variants run side by side in one process (the vLLM engines stay up; each round runs every variant at every
concurrency in turn, the order rotated every round), so load from other jobs hits them alike: every ratio is
the median over rounds of a paired ratio. `N` concurrent requests are `N` prompts submitted at once (vLLM
schedules them with continuous batching; PEFT decodes them as one batch). Greedy, prompts of random token ids,
every reply exactly `--new-tokens` long (`ignore_eos`, `min_new_tokens`), eager mode (`enforce_eager`; `--compiled`:
vLLM's default `torch.compile` mode, compiled when each engine starts) for
every engine, every engine and PEFT in `--dtype`. Threads: vLLM's own CPU binding (`VLLM_CPU_OMP_THREADS_BIND`
unset is vLLM's `auto`: each rank's cores of one NUMA node, one core left to the scheduler) and torch's default
for PEFT; with more ranks than NUMA nodes (TP=2 on one node, where `auto` stops), the allowed cores are split
evenly between the ranks, one per rank left to the scheduler where a rank has more than one. `--one-thread`: the
old mode, one torch thread for PEFT and one bound core per vLLM rank. A `VLLM_CPU_OMP_THREADS_BIND` in the
environment is used as given. `--tensor-parallel-size 2` applies to the vLLM engines only (PEFT has none) and
needs head counts that divide by 2 (the Qwen shape: 14 heads, 2 KV heads; SmolLM2's 9 do not). `--profile N`:
no throughput rounds; the routed engine (and the base, to compare) generate `N` requests once under vLLM's
torch profiler, in its own worker processes and thread binding, and the top operators by CPU time go to
results/serve-<dtype>-tp<k>-profile.txt. The adapter: R-LoRA r=8, N=5 heads on gate_proj, up_proj,
down_proj, random init with its offset path, moved as if trained; its export with uniform gates is a LoRA of
rank 16. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
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
VLLM_VARIANTS = ("base", "export", "routed")
MODELS = {"smollm2": "SmolLM2-135M", "qwen": "Qwen2.5-0.5B shape"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# name: (numerator, denominator), the concurrencies with a target, the target (None: reported only)
RATIOS = {
    "routed / vLLM base": (("routed", "base"), (8, 32), 0.9),  # what the plugin costs inside vLLM
    "routed / export": (("routed", "export"), (8, 32), 0.8),
    "routed / peft": (("routed", "peft"), (32,), 5.0),
    "peft / transformers base": (("peft", "hf_base"), (), None),  # what the adapter costs in PEFT
    "vLLM base / transformers base": (("base", "hf_base"), (), None),  # what vLLM gains by itself
}
BIND = "VLLM_CPU_OMP_THREADS_BIND"


def stem(args: argparse.Namespace) -> str:
    """The results' file name: dtype, tensor parallelism, the thread mode and the compile mode, so that runs do
    not overwrite each other (results/serve.md sums them up)."""
    mode = ("-1thread" if args.one_thread else "") + ("-compiled" if args.compiled else "")
    return f"serve-{args.dtype}-tp{args.tensor_parallel_size}{mode}"


def thread_binding(tp: int, one_thread: bool) -> str | None:
    """The `VLLM_CPU_OMP_THREADS_BIND` to set for the vLLM workers, or None for vLLM's own `auto`."""
    from vllm.utils import cpu_resource_utils

    cpus = cpu_resource_utils.get_allowed_cpu_list()
    cores: dict[int, int] = {}  # one logical CPU per physical core (the last), as vLLM's `auto` takes on x86
    for cpu in sorted(cpus, key=lambda c: c.id):
        cores[cpu.physical_core] = cpu.id
    ids = sorted(cores.values())
    if one_thread:
        return "|".join(str(i) for i in ids[:tp])
    if tp <= len(cpu_resource_utils.get_visible_memory_node()):
        return None  # vLLM's `auto`: one NUMA node per rank
    if len(ids) < tp:
        sys.exit(f"--tensor-parallel-size {tp} needs {tp} cores, {len(ids)} allowed")
    per = len(ids) // tp
    groups = [ids[rank * per : (rank + 1) * per] for rank in range(tp)]
    if per > 1:  # as `auto` does: one core per rank left to the scheduler and the frontend
        groups = [group[:-1] for group in groups]
    return "|".join(",".join(str(i) for i in group) for group in groups)


def prepare(model: str, work: Path, smollm2_dir: Path | None) -> tuple[Path, Path, Path]:
    """The base model's directory, the R-LoRA adapter on it and its export with uniform gates (fp32 files; each
    engine casts them to its dtype)."""
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


def engine(variant: str, base: Path, adapter: Path, args: argparse.Namespace, **extra):  # noqa: ANN201
    from vllm import LLM

    common = dict(model=str(base), dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                  enforce_eager=not args.compiled, max_model_len=256, max_num_seqs=32, kv_cache_memory_bytes=256 << 20,
                  enable_prefix_caching=False,  # every round's prompts are the same: each prefill is computed
                  skip_tokenizer_init=True, disable_log_stats=False, seed=0)  # fmt: skip
    if variant == "export":
        return LLM(**common, enable_lora=True, max_lora_rank=16, max_loras=1, **extra)
    if variant == "routed":
        return LLM(**common, hf_overrides=hf_overrides(str(adapter)), **extra)
    return LLM(**common, **extra)


def worker_cores(llm) -> list[list[int]] | None:  # noqa: ANN001
    """The cores each vLLM rank's OpenMP threads are bound to, as vLLM computes them (None: not bound)."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    manager = OMPProcessManager(llm.llm_engine.vllm_config)
    return None if manager.skip_setup else manager.cpu_lists


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


def random_prompts(base: Path, n: int, length: int) -> list[list[int]]:
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1)).tolist()


def run_model(model: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """{concurrency: {variant: {"tokens_per_s": [...per round], "ttft_s": [...]}}}, and the vLLM ranks' cores."""
    from vllm.lora.request import LoRARequest

    base, adapter, export = prepare(model, args.work_dir, args.smollm2_dir)
    started = time.perf_counter()
    llms = {v: engine(v, base, adapter, args) for v in args.variants if v in VLLM_VARIANTS}
    cores = {v: worker_cores(llm) for v, llm in llms.items()}
    print(f"{MODELS[model]}: {len(llms)} engines up in {time.perf_counter() - started:.0f} s", flush=True)
    peft_model = None
    if {"peft", "hf_base"} & set(args.variants):
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[args.dtype])
        peft_model = PeftModel.from_pretrained(hf_model, str(adapter)).eval()
    prompts = random_prompts(base, max(args.concurrency), args.prompt)
    lora = LoRARequest("export", 1, str(export))

    def measure(variant: str, n: int) -> tuple[float, float]:
        if variant == "peft":
            return run_peft(peft_model, prompts[:n], args.new_tokens)
        if variant == "hf_base":
            with peft_model.disable_adapter():
                return run_peft(peft_model, prompts[:n], args.new_tokens)
        return run_vllm(llms[variant], prompts[:n], args.new_tokens, lora if variant == "export" else None)

    keys = list(args.variants)
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
    return results, cores


def profile(model: str, args: argparse.Namespace) -> list[str]:
    """The routed engine (and the others of `--profile-variants`, one engine at a time) generating
    `--profile` requests once under vLLM's torch profiler, in its own worker processes: each rank's top
    operators by self CPU time (vLLM's table, `<worker>.profiler_out.txt`), with the wall time of the same
    call without and with the profiler."""
    base, adapter, export = prepare(model, args.work_dir, args.smollm2_dir)
    from vllm.lora.request import LoRARequest

    n = args.profile
    prompts = random_prompts(base, n, args.prompt)
    lines = []
    for variant in args.profile_variants:
        trace_dir = Path(tempfile.mkdtemp(prefix=f"{model}-{variant}-", dir=args.work_dir))
        config = dict(profiler="torch", torch_profiler_dir=str(trace_dir), torch_profiler_with_stack=False)
        llm = engine(variant, base, adapter, args, profiler_config=config)
        lora = LoRARequest("export", 1, str(export)) if variant == "export" else None
        run_vllm(llm, prompts, args.new_tokens, lora)  # warm-up
        plain, _ = run_vllm(llm, prompts, args.new_tokens, lora)
        llm.start_profile()
        profiled, _ = run_vllm(llm, prompts, args.new_tokens, lora)
        llm.stop_profile()
        cores = worker_cores(llm)
        llm.llm_engine.engine_core.shutdown()
        lines += [f"## {MODELS[model]}, {VARIANTS[variant]}: {n} concurrent requests, {args.new_tokens} new tokens",
                  "", f"wall time {plain:.3f} s ({n * args.new_tokens / plain:.1f} tokens/s) without the "
                  f"profiler, {profiled:.3f} s with it; ranks' cores {cores}; traces in {trace_dir}", ""]  # fmt: skip
        tables = sorted(trace_dir.glob("*.profiler_out.txt"))
        for table in tables:
            lines += [f"### {table.name.removesuffix('.profiler_out.txt')}", "", "```", table.read_text().rstrip(),
                      "```", ""]  # fmt: skip
        if not tables:
            lines += ["(vLLM wrote no table)", ""]
    return lines


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
        for n, variants in results.items():
            for name, ((a, b), at, target) in RATIOS.items():
                if a not in variants or b not in variants:
                    continue
                med, low, high = paired(results, n, a, b)
                goal = f">= {target:g}x" if n in at else "-"
                met = ("yes" if med >= target else "**no**") if n in at else "-"
                lines.append(f"| {MODELS[model]} | {n} | {name} | {med:.2f} ({low:.2f}-{high:.2f}) | {goal} | {met} |")
    return lines


def summary(out: Path) -> list[str]:
    """results/serve.md: the targeted ratios and the routed engine's throughput of every
    `serve-<dtype>-tp<k>[-compiled].json` in `out`, one column per configuration, so that TP=2 stands beside TP=1."""
    runs = {}
    paths = [*out.glob("serve-*-tp[12].json"), *out.glob("serve-*-tp[12]-compiled.json")]
    for path in sorted(paths, key=lambda p: (p.stem.split("-tp")[1], "float32" not in p.stem)):
        record = json.loads(path.read_text())  # JSON keys: the concurrencies as strings
        runs[path.stem] = {m: {int(n): v for n, v in per.items()} for m, per in record["results"].items()}
    columns = [stem.removeprefix("serve-").replace("-tp", ", TP=").replace("-", ", ") for stem in runs]
    lines = ["# Serving throughput: the routed plugin inside vLLM, every configuration measured", "",
             "Written by `python -m benchmarks.serve` after each run, from the files below (each with its command,"
             " machine, threads, load, and every variant's tokens/s and time to first token). Paired medians"
             " over rounds, range in brackets; TP=1 and TP=2 are separate runs: compare their columns, not"
             " paired.", "", *(f"- [{stem}.md]({stem}.md)" for stem in runs), "",
             f"| model | concurrent requests | measure | target | {' | '.join(columns)} |",
             "|---|---|---|---|" + "---|" * len(runs)]  # fmt: skip
    rows = sorted({(model, n) for results in runs.values() for model, per in results.items() for n in per},
                  key=lambda row: (list(MODELS).index(row[0]), row[1]))  # fmt: skip
    for model, n in rows:
        for name in ("routed / vLLM base", "routed / export", "routed", "base"):  # ratios, then tokens/s
            (a, b), at, target = RATIOS.get(name, ((name, None), (), None))
            cells = []
            for results in runs.values():
                variants = results.get(model, {}).get(n, {})
                if a not in variants or (b is not None and b not in variants):
                    cells.append("-")
                elif b is None:
                    cells.append(f"{statistics.median(variants[a]['tokens_per_s']):.1f}")
                else:
                    med, low, high = paired({n: variants}, n, a, b)
                    missed = n in at and med < target
                    cells.append(f"{med:.2f} ({low:.2f}-{high:.2f})" + (" **missed**" if missed else ""))
            goal = f">= {target:g}x" if n in at else "-"
            label = name if b else f"{VARIANTS[name]}: tokens/s"
            lines.append(f"| {MODELS[model]} | {n} | {label} | {goal} | {' | '.join(cells)} |")
    return lines


def plot(all_results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4), squeeze=False)
    for ax, (model, results) in zip(axes[0], all_results.items(), strict=True):
        ns = list(results)
        for variant in results[ns[0]]:
            speeds = [statistics.median(results[n][variant]["tokens_per_s"]) for n in ns]
            ax.plot(ns, speeds, marker="o", label=VARIANTS[variant])
        ax.set(title=f"{MODELS[model]}, {title}", xlabel="concurrent requests", ylabel="generated tokens/s",
               xscale="log")  # fmt: skip
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: both; the Qwen shape at TP=2")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="every engine's and PEFT's")
    parser.add_argument("--tensor-parallel-size", type=int, choices=(1, 2), default=1, help="vLLM engines only")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="default: all five; at TP=2 the three vLLM engines")  # fmt: skip
    parser.add_argument("--one-thread", action="store_true",
                        help="the old mode: one torch thread for PEFT, one bound core per vLLM rank")  # fmt: skip
    parser.add_argument("--compiled", action="store_true", help="vLLM's default torch.compile mode, not eager")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", type=int, metavar="N",
                        help="no rounds: profile the routed engine at N concurrent requests")  # fmt: skip
    parser.add_argument("--profile-variants", nargs="+", choices=VLLM_VARIANTS, default=["routed", "base"])
    parser.add_argument("--smollm2-dir", type=Path, help="SmolLM2's converted weights (examples/prepare_smollm2.py)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rlora-serve"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    tp = args.tensor_parallel_size
    args.models = args.models or (["qwen"] if tp > 1 else list(MODELS))
    args.variants = args.variants or (list(VLLM_VARIANTS) if tp > 1 else list(VARIANTS))
    if tp > 1 and "smollm2" in args.models:
        parser.error("SmolLM2-135M's 9 attention heads and 3 KV heads do not divide by 2: --models qwen")
    if max(args.concurrency + [args.profile or 1]) > 32:
        parser.error("at most 32 concurrent requests (the engines' max_num_seqs)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one_thread:
        torch.set_num_threads(1)  # PEFT and transformers `generate`, in this process
    import vllm

    if BIND not in os.environ:  # set before the first engine starts: its processes read it
        binding = thread_binding(tp, args.one_thread)
        if binding is not None:
            os.environ[BIND] = binding
    binding = os.environ.get(BIND, "auto (unset)")
    print(f"{BIND}={binding}; torch threads (PEFT) {torch.get_num_threads()}", flush=True)

    started, load = time.time(), os.getloadavg()
    command = " ".join(["python -m benchmarks.serve", *(argv if argv is not None else sys.argv[1:])])
    name = stem(args)
    setting = (
        f"{args.dtype}, TP={tp}" + (", one thread" if args.one_thread else "") + (", compiled" if args.compiled else "")
    )
    if args.profile:
        lines = [f"# Where the time goes: vLLM engines, {setting}", "",
                 f"Generated by `{command}` in {{minutes}} min; {BIND}={binding}.", "", *machine(), ""]  # fmt: skip
        for model in args.models:
            lines += profile(model, args)
        text = "\n".join(lines).replace("{minutes}", f"{(time.time() - started) / 60:.1f}")
        (args.out / f"{name}-profile.txt").write_text(text)
        print(text)
        return

    all_results, all_cores = {}, {}
    for model in args.models:  # the results are written after each model
        all_results[model], all_cores[model] = run_model(model, args)
        recorded = {key: value for key, value in vars(args).items() if not isinstance(value, Path)}
        record = {"args": recorded, "threads_bind": binding, "torch_threads": torch.get_num_threads(),
                  "vllm_worker_cores": all_cores, "results": all_results}  # fmt: skip
        (args.out / f"{name}.json").write_text(json.dumps(record, indent=1))
        cores = "; ".join(f"{MODELS[m]} {v}: {c}" for m, per in all_cores.items() for v, c in per.items())
        lines = [
            f"# Serving throughput ({setting}): vLLM with the base model, the export and the routed plugin, "
            "and PEFT generate",
            "",
            f"Generated by `{command}` in {(time.time() - started) / 60:.1f} min.",
            "",
            *machine(),
            f"- vllm {vllm.__version__}, {args.dtype}, tensor parallelism {tp} (vLLM engines), "
            f"{'compiled' if args.compiled else 'eager'} mode, greedy; "
            f"prompts of {args.prompt} random token ids, {args.new_tokens} new tokens per request; "
            f"{args.rounds} timed rounds after one warm-up round",
            f"- threads: {BIND}={binding}; each vLLM rank's cores {cores or '-'}; "
            f"PEFT and transformers: {torch.get_num_threads()} torch threads",
            f"- load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load)}, at end "
            f"{tuple(round(x, 2) for x in os.getloadavg())}",
            "",
            *tables(all_results),
            "",
        ]
        (args.out / f"{name}.md").write_text("\n".join(lines))
        plot(all_results, args.out / f"{name}.png", setting)
        (args.out / "serve.md").write_text("\n".join(summary(args.out)) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
