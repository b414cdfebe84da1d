"""ms-swift's `--tuner_type rlora`: each argument R-LoRA refuses, and `swift rlhf --rlhf_type dpo`.

The refusals run `check_arguments` in-process on ms-swift's own argument classes with their own defaults (their
`__post_init__`, which loads the model's info, skipped): the same function that the plugin runs from ms-swift's
argument parsing, which tests/test_ms_swift.py shows on real `swift` command lines. Marker `ms_swift`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml
from test_ms_swift import REPO, SEED, plugin, swift

pytestmark = pytest.mark.ms_swift
REFUSED = "--tuner_type rlora: "


def arguments(kind: str, **over):
    """An ms-swift arguments object of `kind` (sft, rlhf, infer, export) with ms-swift's defaults and `over`."""
    import swift.arguments as swift_arguments

    name = {"sft": "SftArguments", "rlhf": "RLHFArguments"}.get(kind, f"{kind.title()}Arguments")
    cls = getattr(swift_arguments, name)
    args = cls.__new__(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in fields.items():
        if f.default_factory is not dataclasses.MISSING:
            setattr(args, name, f.default_factory())
        else:
            setattr(args, name, None if f.default is dataclasses.MISSING else f.default)
    assert set(over) <= set(fields), set(over) - set(fields)
    for name, value in {"tuner_type": "rlora", **over}.items():
        setattr(args, name, value)
    return args


def refusal(kind: str, **over) -> str:
    from rlora_plugin.host import HostConfigError
    from rlora_plugin.ms_swift.tuner import check_arguments

    with pytest.raises(HostConfigError) as error:
        check_arguments(arguments(kind, **over))
    return str(error.value)


AUX = json.dumps({"rlora_router_aux_loss_coef": 0.01})


@pytest.mark.parametrize(
    ("kind", "over", "message"),
    [
        (
            "sft",
            {"model_kwargs": '{"rlora_num_head": 3}'},
            "`rlora_num_head: 3` is not an R-LoRA key. Fix: did you mean",
        ),
        ("sft", {"model_kwargs": {"RLORA_INIT": "randon"}}, "`rlora_init: 'randon'` is invalid. Fix: choose one of"),
        ("sft", {"model_kwargs": '{"rlora_num_heads": 0}'}, "`rlora_num_heads: 0` is invalid"),
        ("sft", {"lora_rank": 0}, "`lora_rank: 0` is invalid. Fix: the rank must be an integer >= 1"),
        ("sft", {"lora_alpha": -1}, "`lora_alpha: -1` is invalid"),
        ("sft", {"use_dora": True}, "`use_dora: True` is not supported: DoRA is a variant of plain LoRA"),
        ("sft", {"lorap_lr_ratio": 16.0}, "`lorap_lr_ratio: 16.0` is not supported"),
        ("sft", {"init_weights": "pissa"}, "`init_weights: 'pissa'` is not supported: R-LoRA has its own init"),
        ("sft", {"tuner_backend": "unsloth"}, "`tuner_backend: 'unsloth'` is not supported"),
        ("sft", {"lora_bias": "all"}, "`lora_bias: 'all'` is not supported"),
        ("sft", {"lora_dtype": "bfloat16"}, "`lora_dtype: 'bfloat16'` is not supported"),
        ("sft", {"task_type": "embedding"}, "`task_type: 'embedding'` is not supported with R-LoRA. Fix: use one of"),
        ("sft", {"model_kwargs": AUX}, "`rlora_router_aux_loss_coef: 0.01` needs non-reentrant gradient checkpointing"),
        ("sft", {"model_kwargs": AUX, "gradient_checkpointing": False, "enable_dft_loss": True}, "`--enable_dft_loss"),
        ("sft", {"model_kwargs": AUX, "resume_from_checkpoint": "ckpt"}, "needs non-reentrant gradient checkpointing"),
        ("rlhf", {"rlhf_type": "dpo", "model_kwargs": AUX}, "is not supported with `swift rlhf --rlhf_type dpo`"),
        ("export", {"merge_lora": True}, "`merge_lora: True` is not supported: R-LoRA adapters cannot be merged"),
        ("infer", {"merge_lora": True}, "`merge_lora: True` is not supported"),
        ("infer", {"infer_backend": "vllm"}, "`infer_backend: 'vllm'` is not supported"),
    ],
)
def test_refused_before_the_model_loads(kind, over, message):
    text = refusal(kind, **over)
    assert text.startswith(REFUSED) and message in text, text


def test_environment_options_are_checked_too(monkeypatch):
    monkeypatch.setenv("RLORA_ROUTER_TOPK", "2")  # `RLORA_ROUTER_TOP_K=2 swift sft ...` is ms-swift's other way
    assert "`rlora_router_topk: 2` is not an R-LoRA key. Fix: did you mean `rlora_router_top_k`?" in refusal("sft")


def test_accepted_runs(monkeypatch):
    from rlora_plugin.ms_swift.tuner import build_config, check_arguments

    check_arguments(arguments("sft", model_kwargs=AUX, gradient_checkpointing_kwargs='{"use_reentrant": false}'))
    check_arguments(arguments("sft", tuner_type="lora", use_dora=True))  # not an R-LoRA run: not ours to check
    check_arguments(arguments("infer", adapters=["ckpt"]))
    monkeypatch.setenv("RLORA_ROUTER_TOP_K", "2")  # ms-swift exports --model_kwargs as str(value): JSON-decoded
    config = build_config(arguments("sft", lora_rank=4, seed=SEED), model_kwargs={"rlora_init": "zero"})
    assert (config.r, config.lora_alpha, config.init_seed) == (4, 32, SEED)  # ms-swift's default alpha
    assert (config.router_top_k, config.init) == (2, "zero")


def test_keys_are_the_documented_ones():
    """docs/ms-swift.md's table lists `rlora_<field>` keys (tests/test_docs.py checks it against RLoraConfig)."""
    from rlora_plugin.config import Source, fields_from
    from rlora_plugin.ms_swift.tuner import HOST

    assert set(HOST.rlora_keys()) == {f"rlora_{name}" for name in fields_from(Source.RLORA, Source.RUN_SEED)}


def test_the_example_config_is_accepted():
    """examples/ms-swift/cpu-multitask.yaml: ms-swift's own keys, and an R-LoRA run the plugin accepts."""
    from rlora_plugin.ms_swift.tuner import build_config

    config = yaml.safe_load((REPO / "examples" / "ms-swift" / "cpu-multitask.yaml").read_text())
    config["model_kwargs"] = json.dumps(config["model_kwargs"])  # as ms-swift's YAML reader passes it
    rlora = build_config(arguments("sft", **config), model_kwargs=json.loads(config["model_kwargs"]))
    assert (rlora.r, rlora.lora_alpha, rlora.lora_dropout, rlora.num_heads, rlora.init_seed) == (8, 16, 0.1, 5, 42)


def test_dpo_reference_is_the_model_without_the_adapter(tiny, tmp_path):
    """`swift rlhf --rlhf_type dpo` looks the tuner up in tuners_map: the policy is R-LoRA, TRL's reference is the
    same model with the adapter switched off, so at step 1 (an exact-at-init adapter) the loss is ln 2."""
    rows = [json.loads(line) for line in tiny["preference"].read_text().splitlines()]
    data = tmp_path / "dpo.jsonl"
    chat = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}] for r in rows]
    data.write_text(
        "".join(
            json.dumps({"messages": m, "rejected_response": r["rejected"]}) + "\n"
            for m, r in zip(chat, rows, strict=True)
        )
    )
    out = tmp_path / "out"
    proc = swift(
        tmp_path,
        "rlhf", "--rlhf_type", "dpo", "--tuner_type", "rlora", "--external_plugins", plugin(),
        "--model", str(tiny["model"]), "--model_type", "llama", "--template", "chatml", "--dataset", str(data),
        "--torch_dtype", "float32", "--lora_rank", "4", "--model_kwargs", '{"rlora_num_heads": 2}',
        "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1",
        "--split_dataset_ratio", "0", "--dataloader_num_workers", "0", "--dataset_num_proc", "1",
        "--report_to", "none", "--output_dir", str(out), "--add_version", "false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    assert float(next(r for r in records if "loss" in r)["loss"]) == pytest.approx(math.log(2), abs=1e-4)
    config = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_heads"]) == ("RLORA", 2)
