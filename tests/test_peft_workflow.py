"""What PEFT users rely on, for the RLORA type: registration, save and reload, adapters, generate with the KV
cache, gradient checkpointing, the merge refusal, unload, the model card."""

import importlib
import json
import subprocess
import sys

import pytest
import torch
from hub_cache import cache_as_downloaded
from peft import AutoPeftModelForCausalLM, PeftModel, PeftType, get_peft_model
from safetensors.torch import load_file
from tiny_models import MLP, PAD, adapted_layers, greedy, perturb, tiny_llama, tokens

import rlora_plugin
from rlora_plugin import RLoraConfig, RLoraLinear
from rlora_plugin.errors import ConfigError
from rlora_plugin.layer import MERGE_REFUSAL
from rlora_plugin.model_card import UNREGISTERED_ERROR
from rlora_plugin.saved import saved_peft_type


def trained_model(**config):
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, **config))
    perturb(model)
    return model.eval()


def test_registration_is_idempotent():
    importlib.reload(rlora_plugin.registration).register_rlora()
    rlora_plugin.registration.register_rlora()
    assert PeftType("RLORA") is PeftType.RLORA
    assert list(PeftType).count(PeftType.RLORA) == 1
    assert PeftType.RLORA == "RLORA"


def test_loading_without_import_fails_and_with_import_works(tmp_path):
    trained_model().save_pretrained(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "base")
    script = (
        "import sys; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'base'}')\n"
        "if len(sys.argv) > 1: import rlora_plugin\n"
        f"PeftModel.from_pretrained(base, r'{tmp_path}')\n"
    )
    without = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert without.returncode != 0 and "RLORA" in without.stderr
    with_import = subprocess.run([sys.executable, "-c", script, "import"], capture_output=True, text=True)
    assert with_import.returncode == 0, with_import.stderr


def test_save_writes_a_normal_peft_adapter(tmp_path):
    model = trained_model(num_heads=3, r=4, init_seed=11, use_rslora=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "RLORA"
    expected = {
        "r": 4,
        "num_heads": 3,
        "init": "random",
        "head_dropout": "per_head",
        "init_gamma": 64.0,
        "router_init": "zero",
        "router_temperature": 1.0,
        "use_rslora": True,
        "init_seed": 11,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "layers_to_transform": None,
        "modules_to_save": None,
    }
    assert {k: config[k] for k in expected} == expected
    assert sorted(config["target_modules"]) == sorted(MLP)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    gate = "base_model.model.model.layers.0.mlp.gate_proj."
    assert {k.removeprefix(gate): tuple(v.shape) for k, v in weights.items() if k.startswith(gate)} == {
        "rlora_A": (4, 32),
        "rlora_B": (48, 12),
        "rlora_router": (3, 32),
        "rlora_offset_A": (4, 32),
        "rlora_offset_B": (48, 4),
    }
    assert len(weights) == 2 * 3 * 5


def test_reload_reproduces_outputs_bit_for_bit(tmp_path):
    model = trained_model()
    ids = tokens()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    # The offset path must come from the file, not be drawn again from the seed: change the seed.
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"init_seed": 0', '"init_seed": 99'))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, expected)
    for ours, theirs in zip(adapted_layers(model), adapted_layers(reloaded), strict=True):
        assert torch.equal(ours.rlora_offset_B["default"], theirs.rlora_offset_B["default"])


def test_adapter_loads_by_its_model_hub_id(tmp_path, monkeypatch):
    """Shared on a hub, an adapter loads by its id (here from the hub cache, offline, as after a download), and
    `saved_peft_type` (behind both hosts' adapter checks) reads its type the same way."""
    import huggingface_hub

    model = trained_model().eval()
    model.save_pretrained(tmp_path / "adapter")
    cache_as_downloaded(tmp_path / "adapter", "someone/rlora-tiny", tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reloaded = PeftModel.from_pretrained(tiny_llama(), "someone/rlora-tiny").eval()
    assert torch.equal(reloaded(tokens()).logits, model(tokens()).logits)
    assert saved_peft_type("someone/rlora-tiny") == saved_peft_type(tmp_path / "adapter") == "RLORA"
    assert saved_peft_type("someone/not-downloaded") is None and saved_peft_type(tmp_path) is None


def test_reload_is_frozen_unless_trainable(tmp_path):
    trained_model().save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    names = {n.split(".")[-2] for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {"rlora_A", "rlora_B", "rlora_router"}


def test_auto_peft_model_loads_from_the_adapter_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = type(tiny_llama()).from_pretrained(tmp_path / "base")
    model = get_peft_model(base, RLoraConfig(target_modules=MLP))
    perturb(model)
    model.eval()
    ids = tokens()
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(loaded(ids).logits, expected)


def test_disable_adapter_gives_the_base_model():
    ids = tokens()
    expected = tiny_llama()(ids).logits
    model = trained_model()
    assert not torch.allclose(model(ids).logits, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(model(ids).logits, expected)


def test_several_named_adapters(tmp_path):
    ids = tokens()
    model = trained_model()
    model.add_adapter("second", RLoraConfig(target_modules=MLP, num_heads=2, init_seed=5))
    model.eval()  # the new adapter's dropout modules are created in training mode, as in PEFT's LoRA
    second_params = [n for n, p in model.named_parameters() if ".second" in n]
    assert second_params and not any(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    default_out = model(ids).logits
    model.set_adapter("second")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-5)  # still at init
    model.set_adapter("default")
    assert torch.equal(model(ids).logits, default_out)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    model.delete_adapter("second")
    assert not any(".second" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("config", "batch", "length", "new"),
    [({}, 1, 4, 6), ({"r": 4, "num_heads": 3, "router_init": "kaiming"}, 2, 6, 8)],
    ids=["defaults", "kaiming-router-batch"],
)
def test_kv_cache_decoding_equals_full_recompute(config, batch, length, new):
    """`generate` with the KV cache (one new token per step through the adapted layers) picks the tokens of
    argmax over full forwards of the whole sequence, with the scores of `generate(use_cache=False)`; and the
    adapter changes what is generated."""
    model, ids = trained_model(**config), tokens(batch=batch, length=length)
    options = dict(max_new_tokens=new, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    cached = model.generate(input_ids=ids, output_scores=True, return_dict_in_generate=True, **options)
    full = model.generate(input_ids=ids, output_scores=True, return_dict_in_generate=True, use_cache=False, **options)
    recomputed = ids
    with torch.no_grad():
        for _ in range(new):
            chosen = model(recomputed, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            recomputed = torch.cat([recomputed, chosen], dim=1)
    assert cached.sequences.shape == (batch, length + new) and torch.equal(cached.sequences, recomputed)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(full.scores), rtol=1e-4, atol=1e-5)
    with model.disable_adapter():
        assert not torch.equal(greedy(model, ids, new), cached.sequences[:, length:])


def test_gradient_checkpointing_gives_the_same_gradients():
    """With checkpointing, the backward recomputes each decoder layer (every adapted layer runs twice a step)
    and the gradients are those of the plain forward."""

    def grads(checkpointing: bool):
        model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, lora_dropout=0.0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        calls = []
        adapted_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
        ids = tokens()
        model(ids, labels=ids).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)
        return [p.grad for p in model.parameters() if p.requires_grad]

    plain, checkpointed = grads(False), grads(True)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_merge_is_refused_with_the_reason(call):
    """PEFT's merge calls raise the refusal that says why and what to do instead, and leave the model as it was."""
    model, ids = trained_model(), tokens()
    expected = model(ids).logits
    with pytest.raises(
        ConfigError, match="RLoraModel: `merge: True` is refused: .*cannot be merged.*router gates"
    ) as info:
        getattr(model, call)()
    assert str(info.value) == MERGE_REFUSAL
    assert not any(layer.merged for layer in adapted_layers(model))
    assert torch.equal(model(ids).logits, expected)


def test_unload_returns_the_base_model():
    ids = tokens()
    base = trained_model().unload()
    torch.testing.assert_close(base(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)


def test_saved_adapter_has_a_model_card_that_says_how_to_load_it(tmp_path):
    from huggingface_hub import ModelCard

    model = trained_model(num_heads=3)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again replaces the section, it does not add a second one
    card = ModelCard.load(tmp_path / "README.md")
    assert {"rlora", "peft"} <= set(card.data.tags)
    assert card.data.library_name == "peft"  # PEFT's own card data is kept
    assert card.text.count("## R-LoRA adapter") == 1
    for text in ("pip install -e ./rlora-plugin", "import rlora_plugin", UNREGISTERED_ERROR, "| `num_heads` | `3` |"):
        assert text in card.text, text


def test_transformers_adapter_paths(tmp_path):
    """After `import rlora_plugin`, transformers' own adapter loading works: `AutoModelForCausalLM` on an adapter
    directory (it loads the recorded base, then the adapter) and `model.load_adapter` on a transformers model."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), RLoraConfig(target_modules=MLP))
    perturb(model)
    model.eval().save_pretrained(tmp_path / "adapter")
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        auto = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        assert any(isinstance(m, RLoraLinear) for m in auto.modules())
        torch.testing.assert_close(auto(ids).logits, expected, rtol=0, atol=0)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        plain.load_adapter(str(tmp_path / "adapter"))
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)
        plain.disable_adapters()
        torch.testing.assert_close(plain(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)
