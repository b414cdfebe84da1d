"""`adapter: rlora` on a bitsandbytes-quantized base through the Axolotl CLI, on CPU (`-m cli`).

bitsandbytes 0.50.2 (an Axolotl dependency) quantizes, runs forward and backward of `Linear4bit` and
`Linear8bitLt` on CPU, so both are trained end to end: `load_in_4bit` (Axolotl's QLoRA config: NF4, double
quantization) with gradient checkpointing, and `load_in_8bit` (Axolotl's 8-bit LoRA config), both built by
Axolotl's own code for the adapter it quantizes for. Each run checks that the quantized layers
were the ones R-LoRA wrapped, that the adapted model equals the quantized base at init, that the loss falls,
and that the saved adapter, reloaded with `PeftModel.from_pretrained` onto a freshly quantized base in
this process, reproduces the trained model to float error. The base is loaded in the run's dtype (recorded in
the output's config.json): Axolotl runs `load_in_8bit` in float16 (embeddings, norms and lm_head stay
float16), and R-LoRA keeps bitsandbytes' CPU Linear4bit off its packed bf16 inference kernel, so both
models take the same path on every CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import axolotl  # noqa: F401  (these tests need it: fail, never skip, without it)
import pytest
from axolotl_runs import BIN, Run, train_losses, write_cfg

pytestmark = pytest.mark.cli


def quantized_reload_logits(tiny: dict, adapter_dir: Path, dtype):
    from axolotl_probe import probe_logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import rlora_plugin  # noqa: F401

    # The quantization Axolotl built for the run, as recorded next to the adapter.
    recorded = json.loads((adapter_dir / "config.json").read_text())["quantization_config"]
    base = AutoModelForCausalLM.from_pretrained(
        tiny["model"], dtype=dtype, quantization_config=BitsAndBytesConfig.from_dict(recorded), device_map={"": "cpu"}
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    layer = model.base_model.model.model.layers[0].mlp.down_proj.get_base_layer()
    logits = probe_logits(model)
    # On an AVX512-BF16 CPU bitsandbytes would have packed the 4-bit weight for its bf16 kernel by now.
    assert not getattr(layer, "support_avx512bf16_for_cpu", False)
    assert not getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
    return logits, type(layer).__name__


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized")


@pytest.mark.parametrize("bits, layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_quantized_base(tiny, work, bits, layer):
    import torch

    name = f"q{bits}"
    cfg = write_cfg(
        work,
        name,
        tiny,
        **{f"load_in_{bits}bit": True},
        datasets=[{"path": str(tiny["alpaca"]), "ds_type": "json", "type": "alpaca"}],
        sample_packing=False,
        gradient_checkpointing=bits == 4,
        val_set_size=0,
        eval_steps=None,
        max_steps=4,
        save_steps=4,
    )
    result = Run(name, [str(BIN / "axolotl"), "train", str(cfg)], work).wait()
    result.check()
    out = work / name
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "RLORA"
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1], losses
    init = torch.load(out / "probe_init.pt")
    torch.testing.assert_close(init["adapted"], init["base"], atol=1e-5, rtol=1e-5)  # offset path: exact at init
    trained = torch.load(out / "probe_trained.pt")["trained"]
    assert (trained - init["base"]).abs().max() > 1e-3
    # Axolotl's run dtype (bf16 and fp16 off): float16 for load_in_8bit, float32 otherwise.
    recorded = json.loads((out / "config.json").read_text())
    dtype = recorded["dtype"]
    assert dtype == {4: "float32", 8: "float16"}[bits]
    # Axolotl's own QLoRA config (NF4, double quantization, compute dtype = the run's) or its 8-bit LoRA config.
    quantization = recorded["quantization_config"]
    assert quantization[f"load_in_{bits}bit"] and not quantization[f"load_in_{ {4: 8, 8: 4}[bits] }bit"]
    if bits == 4:
        assert quantization["bnb_4bit_quant_type"] == "nf4" and quantization["bnb_4bit_use_double_quant"]
        assert quantization["bnb_4bit_compute_dtype"] == dtype
    reloaded, base_layer = quantized_reload_logits(tiny, out, getattr(torch, dtype))
    assert base_layer == layer
    # Float error of the run's dtype: 8-bit logits come out of a float16 lm_head (rtol 1e-3 > its rounding).
    atol, rtol = 1e-4, 1e-4 if bits == 4 else 1e-3
    torch.testing.assert_close(reloaded, trained, atol=atol, rtol=rtol)
    assert (trained - init["base"]).abs().max() > 30 * atol
