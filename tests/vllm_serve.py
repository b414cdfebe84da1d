"""Greedy generation with vLLM for tests/test_vllm.py, in its own process (vLLM's engine core is a spawned
process, so the code that builds `LLM` needs a `__main__` guard):

    python tests/vllm_serve.py JOB_JSON OUT_JSON

JOB_JSON: a job or a list of jobs (served one after the other, each by its own engine, in this process), a job
{"base": DIR, "prompts": [[token ids]], "max_tokens": N} and either "export": DIR, "max_lora_rank": R
(the export served through vLLM's LoRA support) or "hf_overrides": {...} (the routed adapter, by the plugin) or
neither (the base model alone);
optionally "enforce_eager": false (vLLM's default, torch.compile), "dtype" (float32 unless given),
"tensor_parallel_size".
OUT_JSON (a list for a list of jobs): per prompt, the generated ids and each chosen token's log-probability,
with the adapter (`lora`, `lora_logprobs`) and, for the export, without it (`base`, `base_logprobs`). Prompts go
in as token ids so that both sides decode from the same tokens; `ignore_eos` makes every reply N tokens long.
"""

from __future__ import annotations

import json
import sys


def serve(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    exported = "export" in job
    if exported:
        adapter = dict(enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1)
    else:
        adapter = {key: job[key] for key in ("hf_overrides",) if key in job}
    llm = LLM(
        model=job["base"],
        dtype=job.get("dtype", "float32"),
        tensor_parallel_size=job.get("tensor_parallel_size", 1),
        enforce_eager=job.get("enforce_eager", True),
        max_model_len=512,
        kv_cache_memory_bytes=512 * 2**20,  # else vLLM's CPU worker reserves 92% of the machine's memory
        seed=0,
        **adapter,
    )
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    result = {}
    if exported:
        runs = [("lora", LoRARequest("export", 1, job["export"])), ("base", None)]
    else:
        runs = [("lora" if adapter else "base", None)]
    for name, lora in runs:
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        completions = [out.outputs[0] for out in outputs]
        result[name] = [list(c.token_ids) for c in completions]
        result[f"{name}_logprobs"] = [
            [step[token].logprob for token, step in zip(c.token_ids, c.logprobs, strict=True)] for c in completions
        ]
    llm.llm_engine.engine_core.shutdown()  # the next job's engine starts in this process
    return result


if __name__ == "__main__":
    job_file, out_file = sys.argv[1:3]
    with open(job_file) as f:
        job = json.load(f)
    with open(out_file, "w") as f:
        json.dump([serve(one) for one in job] if isinstance(job, list) else serve(job), f)
