"""What a model-hub user of a saved adapter meets: which call loads a directory laid out as Axolotl writes it,
the error without `import rlora_plugin` (quoted by the card as PEFT words it), and which base to load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, get_peft_model
from tiny_models import MLP, perturb, tiny_llama, tokens
from transformers import AutoModelForCausalLM

from rlora_plugin import RLoraConfig
from rlora_plugin.model_card import FROM_SCRATCH, NOT_ON_THE_INDEX, UNREGISTERED_ERROR

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def axolotl_layout(tmp_path):
    """A trained adapter in a directory as Axolotl writes it: the base model's `config.json` (Axolotl pre-saves
    it at the start of training), then the adapter files and the card."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), RLoraConfig(target_modules=MLP))
    perturb(model)
    model.base_model.model.config.save_pretrained(tmp_path / "adapter")
    model.eval().save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(tokens()).logits
    return tmp_path, expected


def test_auto_peft_model_loads_the_axolotl_layout(axolotl_layout):
    """`AutoPeftModelForCausalLM` (what the card shows) loads it, and so does transformers' `load_adapter` on
    the base. `AutoModelForCausalLM` on the directory does not: next to a
    `config.json`, transformers (5.16, 5.20) takes the directory for a full model with an embedded adapter and
    looks for its weights; if that starts to work, the docs may promise it again."""
    work, expected = axolotl_layout
    auto = AutoPeftModelForCausalLM.from_pretrained(work / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(work / "base").eval()
    plain.load_adapter(str(work / "adapter"))  # transformers' own adapter loading, on the base
    with torch.no_grad():
        torch.testing.assert_close(auto(tokens()).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(plain(tokens()).logits, expected, rtol=0, atol=0)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(work / "adapter")
    card = ModelCard.load(work / "adapter" / "README.md").text
    assert "AutoPeftModelForCausalLM.from_pretrained(ADAPTER)" in card
    assert "Not `AutoModelForCausalLM.from_pretrained(ADAPTER)`: next to the model `config.json`" in card


def test_the_card_quotes_the_error_peft_raises_without_the_import(axolotl_layout):
    """In a process that never imports rlora_plugin, PEFT's loaders fail with exactly the message the card
    quotes, and the card says the fix."""
    work, _ = axolotl_layout
    script = f"""
import sys
from peft import AutoPeftModelForCausalLM, PeftConfig
for load in (PeftConfig.from_pretrained, AutoPeftModelForCausalLM.from_pretrained):
    try:
        load({str(work / "adapter")!r})
    except Exception as exc:
        print(f"{{type(exc).__name__}}: {{exc}}")
assert "rlora_plugin" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [UNREGISTERED_ERROR] * 2, out.stdout
    card = ModelCard.load(work / "adapter" / "README.md").text
    assert f"loading fails with\n`{UNREGISTERED_ERROR}`" in card
    install = "git clone RLORA_PLUGIN_REPOSITORY rlora-plugin && pip install -e ./rlora-plugin"
    assert f"# {NOT_ON_THE_INDEX}\n{install}" in card
    assert "pip install rlora-plugin" not in card  # README.md: not on the package index yet
    assert "import rlora_plugin  # registers the RLORA PEFT type" in card
    assert "| `target_modules` | `['down_proj', 'gate_proj', 'up_proj']` |" in card  # sorted, not in hash order


def test_a_local_base_is_named_with_how_to_record_its_hub_id(axolotl_layout):
    """A base trained from a local copy: the card names the path, says how to load the base by its hub id and
    how to record the hub id; its metadata keeps the base PEFT records (the local path), and
    transformers' "trained from scratch" (its words for a local base, as in Axolotl's card) is replaced."""
    work, _ = axolotl_layout
    card = ModelCard.load(work / "adapter" / "README.md")
    card.text += f"\n# outputs\n\n{FROM_SCRATCH}the train.jsonl dataset.\n"  # as Axolotl's card says it
    card.save(work / "adapter" / "README.md")
    RLoraConfig.from_pretrained(str(work / "adapter")).save_pretrained(str(work / "adapter"))  # writes the card
    card = ModelCard.load(work / "adapter" / "README.md")
    base = str(work / "base")
    assert (
        card.data.base_model
        == json.loads((work / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    for text in (
        f"trained on a local copy, `{base}`, which is not a model-hub id",
        "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HUB_ID), ADAPTER)`",
        "train with it as the base (Axolotl's `base_model`",
        "set\n`base_model_name_or_path` in `adapter_config.json`",
        f"This model is an adapter of the local base model `{base}`, fine-tuned on the train.jsonl dataset.",
    ):
        assert text.replace("\n", " ") in card.text.replace("\n", " "), text
    assert "trained from scratch" not in card.text


def test_a_hub_base_is_linked_and_loaded_by_its_id(axolotl_layout):
    """With the base's hub id recorded (`base_model_name_or_path`, what AutoPeftModelForCausalLM loads), the
    card links it, in its text and in its metadata."""
    work, _ = axolotl_layout
    config = RLoraConfig.from_pretrained(str(work / "adapter"))
    config.base_model_name_or_path = HUB_ID
    config.save_pretrained(str(work / "adapter"))
    assert json.loads((work / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    card = ModelCard.load(work / "adapter" / "README.md")
    assert card.data.base_model == HUB_ID
    assert f"Base model: [`{HUB_ID}`](https://huggingface.co/{HUB_ID})" in card.text
    assert "not a model-hub id" not in card.text
    assert card.text.count("## R-LoRA adapter") == 1
