"""The frozen-gate export to a plain LoRA (docs/method.md#frozen-gates-the-export-to-a-plain-lora): exact, mergeable,
loadable without rlora_plugin, with a card."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import MLP, SIZES, adapted_layers, perturb, tiny_llama, tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.tiny_assets import write_jsonl
from examples.multitask_data import generate
from rlora_plugin import RLoraConfig
from rlora_plugin.errors import ConfigError, InputError
from rlora_plugin.export import export_lora, main, mean_gates, prompts_of, read_prompts
from rlora_plugin.layer import frozen_gate_lora
from rlora_plugin.routing import parse_gates
from rlora_plugin.saved import read_config


def test_frozen_gate_lora_is_the_layer_update_with_constant_gates():
    """B' A' x = s * sum_i c_i B_i A x - s * Bbar0 A0 x, head by head."""
    gen = torch.Generator().manual_seed(0)
    heads, r, d_in, d_out, s = 3, 4, 10, 7, 0.7
    a, a0 = torch.randn(r, d_in, generator=gen), torch.randn(r, d_in, generator=gen)
    b, b0 = torch.randn(d_out, heads * r, generator=gen), torch.randn(d_out, r, generator=gen)
    c, x = torch.tensor([0.2, 0.5, 0.3]), torch.randn(5, d_in, generator=gen)
    expected = s * sum(c[i] * x @ a.T @ b[:, i * r : (i + 1) * r].T for i in range(heads)) - s * x @ a0.T @ b0.T
    lora_a, lora_b = frozen_gate_lora(a, b, c, s, a0, b0)
    assert lora_a.shape == (2 * r, d_in) and lora_b.shape == (d_out, 2 * r)
    torch.testing.assert_close(x @ lora_a.T @ lora_b.T, expected)
    lora_a, lora_b = frozen_gate_lora(a, b, c, s)  # no offset path (init: zero): rank r
    torch.testing.assert_close(x @ lora_a.T @ lora_b.T, expected + s * x @ a0.T @ b0.T)


@pytest.fixture
def trained_zero_router(tmp_path):
    """An R-LoRA adapter whose A and heads moved as in training but whose router stayed zero, so its gates are
    exactly uniform: the uniform export must reproduce it."""
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, num_heads=3, r=4, lora_alpha=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapted_layers(model):
            for weight in (layer.rlora_A["default"], layer.rlora_B["default"]):
                weight.add_(0.1 * torch.randn(weight.shape, generator=gen))
    model.eval().save_pretrained(tmp_path / "rlora")
    return model, tmp_path


def test_uniform_export_reproduces_the_model_and_merges(trained_zero_router):
    model, tmp_path = trained_zero_router
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    assert (expected - tiny_llama()(ids).logits).abs().max() > 1e-2  # the adapter does change the model
    export_lora(tmp_path / "rlora", tmp_path / "lora", "uniform")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == 8  # rank 2r, scaling 1
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_export_lists_its_targets_in_depth_order_and_has_a_card(trained_zero_router):
    """`target_modules` in adapter_config.json are in depth order (PEFT's LoraConfig would save a set in hash
    order, different from run to run), and the card says what the export is and how to load it."""
    from huggingface_hub import ModelCard

    _, tmp_path = trained_zero_router
    assert main([str(tmp_path / "rlora"), str(tmp_path / "lora"), "--gates", "0.2,0.5,0.3"]) == 0
    targets = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"]
    assert targets == [f"model.layers.{i}.mlp.{kind}" for i in range(2) for kind in sorted(MLP)]
    card = ModelCard.load(tmp_path / "lora" / "README.md")
    assert {"lora", "peft", "rlora"} <= set(card.data.tags) and card.data.library_name == "peft"
    for text in (
        "## Plain LoRA exported from an R-LoRA adapter",
        f"from the\nR-LoRA adapter `{tmp_path / 'rlora'}` with its router's gates frozen to `0.2,0.5,0.3`",
        "It loads without rlora-plugin",
        "AutoPeftModelForCausalLM.from_pretrained(ADAPTER)",
        "Target modules (6, listed in `adapter_config.json`): `model.layers.0.mlp.down_proj`,",
    ):
        assert text in card.text, text
    assert "rlora_plugin" not in card.text.split("```python")[1].split("```")[0]  # its loading code needs none


def test_the_export_loads_without_rlora_plugin(trained_zero_router):
    """A fresh process that never imports rlora_plugin loads the export with plain PEFT, merges it, and gets
    the R-LoRA model's logits."""
    model, work = trained_zero_router
    assert main([str(work / "rlora"), str(work / "lora"), "--gates", "uniform"]) == 0
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **{SIZES!r})).eval()
merged = PeftModel.from_pretrained(base, {str(work / "lora")!r}).merge_and_unload()
assert "rlora_plugin" not in sys.modules
torch.save(merged(torch.tensor({tokens().tolist()!r})).logits, {str(work / "logits.pt")!r})
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        expected = model(tokens()).logits
    torch.testing.assert_close(torch.load(work / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5,0.5", r"routing: `gates: '0.5,0.5'` are invalid for an adapter with 3 heads. Fix: give 'uniform'"),
        ("0.5,0.4,0.4", r"they must be >= 0 and sum to 1"),
        ("-0.1,0.6,0.5", r"they must be >= 0 and sum to 1"),
        ("mean-ish", r"give 'uniform' or 3 comma-separated numbers"),
    ],
)
def test_bad_gates_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_gates(text, 3)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err


def test_an_adapter_of_another_peft_type_is_refused(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(target_modules=MLP)).save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError, match=r"adapter_config.json: `peft_type: 'LORA'` is not an R-LoRA adapter's"
    ) as info:
        read_config(tmp_path)
    assert (info.value.key, info.value.value) == ("peft_type", "LORA")


# --gates mean --data: the files the project writes, checked before a model loads ---------------------------------


@pytest.fixture
def routed_adapter(tiny, tmp_path):
    """An R-LoRA adapter with a kaiming router (its gates differ per token) on the tiny base model of `tiny`."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["model"]),
        RLoraConfig(target_modules=MLP, num_heads=3, r=4, router_init="kaiming"),
    )
    perturb(model)
    model.save_pretrained(tmp_path / "rlora")
    return tmp_path / "rlora"


def test_multitask_test_rows_give_the_gates_of_their_chat_rows(tiny, routed_adapter, tmp_path):
    """A row of examples/multitask_data.py's test.jsonl (`task`, `prompt`, `answer`) is the user's turn, as
    examples/evaluate.py prompts the model: the same prompts and gates as its train.jsonl-style chat row (whose
    assistant turn is left out). Chat and alpaca rows keep the prompts they had."""
    _, test = generate(train_per_task=1, test_per_task=2)
    multitask = write_jsonl(tmp_path / "test.jsonl", test)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in test
    ])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    assert prompts_of(multitask, tokenizer) == prompts_of(chat, tokenizer)
    assert prompts_of(multitask, tokenizer)[0] == f"<s><|user|>\n{test[0]['prompt']}</s>\n<|assistant|>\n"
    alpaca = [json.loads(line) for line in tiny["alpaca"].read_text().splitlines()]
    assert prompts_of(tiny["alpaca"], tokenizer) == [r["instruction"] for r in alpaca]  # `input` is empty
    gates, expected = mean_gates(routed_adapter, multitask), mean_gates(routed_adapter, chat)
    assert gates.keys() == expected.keys()
    for name, mean in expected.items():
        torch.testing.assert_close(gates[name], mean, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, r"--data {data}: no such file. Fix: give a jsonl file of prompts"),
        ([], r"rlora_plugin.export: `--data: '{data}'` holds no rows. Fix: give every row a `prompt`"),
        (['{"prompt": "Add 1 and 2."}', "", "{'prompt': 'x'}"], r"--data {data}, line 3: `row: \"{{'prompt': 'x'}}\"` "
         r"is not JSON \(Expecting property name enclosed in double quotes\). Fix: write one JSON object per line"),
        (['{"prompt": "Add 1 and 2."}', '{"task": "addition", "answer": "3"}'], r"--data {data}, line 2: `fields: "
         r"\['answer', 'task'\]` include no prompt field. Fix: give every row a `prompt` \(the user's turn"),
        (['{"prompt": ""}'], r"--data {data}, line 1: `prompt: ''` is not a text. Fix: give the user's turn as text"),
        (['{"conversations": [{"from": "human", "value": "hi"}]}'], r"--data {data}, line 1: `conversations: "
         r"\[{{'from': 'human', 'value': 'hi'}}\]` is not a list of turns with `role` and `content`. Fix: write"),
        (['{"messages": [{"role": "assistant", "content": "4"}]}'], r"line 1: `messages: \[{{'role': 'assistant', "
         r"'content': '4'}}\]` starts with the assistant's turn, so no prompt precedes it"),
        (['{"instruction": "", "input": ""}'], r"line 1: `instruction: ''` with `input: ''` gives no prompt text. "
         r"Fix: give"),
        (["[1, 2]"], r"line 1: `row: \[1, 2\]` is not a JSON object. Fix: give every row"),
    ],
    ids=["missing", "empty", "not-json", "no-prompt-field", "empty-prompt", "sharegpt", "no-user-turn", "empty-alpaca",
         "not-an-object"],
)  # fmt: skip
def test_a_bad_data_file_is_refused_before_a_model_loads(tiny, routed_adapter, monkeypatch, capsys, lines, message):
    """`--gates mean --data FILE`: every row of FILE is checked before the model loads (minutes for a real one),
    and the error names the file, the line, what it found and the fix."""

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before --data was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(PeftModel, "from_pretrained", never)
    data = routed_adapter.parent / "data.jsonl"
    if lines is not None:
        data.write_text("".join(f"{line}\n" for line in lines))
    assert main([str(routed_adapter), str(routed_adapter.parent / "lora"), "--gates", "mean", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert re.search(message.format(data=re.escape(str(data))), err), err
    assert not (routed_adapter.parent / "lora").exists()
    if lines is not None:  # a row's fault is an InputError, an empty file's (the --data setting) a ConfigError
        with pytest.raises(InputError if lines else ConfigError):
            read_prompts(data)


def test_chat_rows_without_a_chat_template_are_refused_before_a_model_loads(tiny, routed_adapter, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(routed_adapter.parent / "plain")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    message = (
        r"`--data: '.*'` holds chat rows \(`messages` or `prompt`\), which need a chat template, and the tokenizer "
        r"'.*plain' has none. Fix: use a base model"
    )
    with pytest.raises(ConfigError, match=message):
        mean_gates(routed_adapter, tiny["chat"], base_model=str(routed_adapter.parent / "plain"))


def test_an_adapter_without_its_base_model_needs_one_named(tiny, tmp_path):
    get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP)).save_pretrained(tmp_path)  # a base built in memory
    assert not read_config(tmp_path).base_model_name_or_path
    with pytest.raises(ConfigError, match=r"`--base-model: None` is needed: .*adapter_config.json records no base"):
        mean_gates(tmp_path, tiny["chat"])


def test_mean_gates_show_their_progress(tiny, routed_adapter, capsys):
    """A pass over a training set can take minutes: a line on stderr for every tenth of the prompts done."""
    mean_gates(routed_adapter, tiny["chat"], batch_size=16)  # 64 prompts: 4 batches
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mean gates")]  # not tqdm's
    assert lines[0] == f"mean gates: 64 prompts of {tiny['chat']}, loading {tiny['model']} with {routed_adapter}"
    assert [line.split(",")[0] for line in lines[1:]] == [
        f"mean gates: {done}/64 prompts ({100 * done // 64}%)" for done in (16, 32, 48, 64)
    ]
