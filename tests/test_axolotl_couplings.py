"""The Axolotl plugin's couplings to Axolotl's private state, and those of the test-only plugin
`tests/cpu_distributed.py` to accelerate's (docs/compatibility.md): each does what it is for on the installed
versions, reads arguments by name, and fails loudly, naming the host, its version and what is missing, when the
host has changed."""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import version
from types import SimpleNamespace

import cpu_distributed
import pytest
import torch
from axolotl.loaders.model import ModelLoader
from axolotl.utils.dict import DictDefault

from rlora_plugin.axolotl_plugin import LOG, quantization
from rlora_plugin.patching import HostChanged, wrap_once


def test_the_plugin_logger_passes_axolotls_log_filter():
    from axolotl.logging_config import AxolotlOrWarnErrorFilter

    def shown(name: str) -> bool:
        return AxolotlOrWarnErrorFilter().filter(logging.LogRecord(name, logging.INFO, __file__, 1, "m", None, None))

    assert shown(LOG.logger.name) and not shown("rlora_plugin")  # the reason for its name


def built_quantization(adapter: str, bits: int, model_type: str, **cfg) -> dict:
    """The `quantization_config` Axolotl's (patched) `ModelLoader._set_quantization_config` builds."""
    quantization.patch_model_loader()
    cfg = DictDefault(
        adapter=adapter, model_config_type=model_type, torch_dtype=torch.bfloat16, **{f"load_in_{bits}bit": True}, **cfg
    )
    loader = SimpleNamespace(cfg=cfg, model_kwargs={}, model_config=SimpleNamespace(), is_fsdp_enabled=False)
    ModelLoader._set_quantization_config(loader)
    assert cfg.adapter == adapter  # presented as qlora/lora only while Axolotl's code ran
    return loader.model_kwargs["quantization_config"].to_dict()


ARCHITECTURES = ["llama", "jamba", "qwen2_moe", "nemotron_h", "falcon_h1"]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_rlora_gets_the_bitsandbytes_config_axolotl_builds_for_lora(model_type, bits):
    lora = "qlora" if bits == 4 else "lora"
    assert built_quantization("rlora", bits, model_type) == built_quantization(lora, bits, model_type)
    kwargs = {"bnb_config_kwargs": {"llm_int8_threshold": 5.0}} if bits == 4 else {}
    assert built_quantization("rlora", bits, model_type, **kwargs) == built_quantization(
        lora, bits, model_type, **kwargs
    )


def test_axolotls_architecture_special_cases_reach_rlora():
    """What a copy of Axolotl's QLoRA config had missed (issue 22, item 6)."""
    for model_type in ("jamba", "qwen2_moe", "nemotron_h"):
        assert built_quantization("rlora", 4, model_type)["bnb_4bit_quant_storage"] == "float32"
        assert (
            built_quantization("rlora", 4, model_type, deepspeed="zero2.json")["bnb_4bit_quant_storage"] == "bfloat16"
        )
    assert built_quantization("rlora", 4, "llama")["bnb_4bit_quant_storage"] == "bfloat16"
    assert "out_proj" in built_quantization("rlora", 4, "falcon_h1")["llm_int8_skip_modules"]
    assert built_quantization("rlora", 8, "falcon_h1")["llm_int8_skip_modules"] == ["out_proj"]
    assert built_quantization("rlora", 8, "jamba")["llm_int8_skip_modules"] == ["mamba"]
    assert (
        built_quantization("rlora", 4, "llama", bnb_config_kwargs={"llm_int8_threshold": 5.0})["llm_int8_threshold"]
        == 5.0
    )


def test_kbit_preparation_is_axolotls_own_for_the_presented_adapter(monkeypatch):
    import axolotl.loaders.model as loader_module

    calls = []
    monkeypatch.setattr(loader_module, "prepare_model_for_kbit_training", lambda m, **kw: calls.append(kw) or m)
    quantization.patch_model_loader()
    for model_type, prepared in (("llama", True), ("qwen", False)):  # Axolotl skips Qwen's for 8-bit LoRA
        cfg = DictDefault(adapter="rlora", load_in_8bit=True, model_config_type=model_type, gradient_checkpointing=True)
        loader = SimpleNamespace(
            cfg=cfg, model=SimpleNamespace(), is_fsdp_enabled=False, is_qlora_and_fsdp_enabled=False
        )
        ModelLoader._prepare_model_for_quantization(loader)
        assert cfg.adapter == "rlora" and len(calls) == int(prepared), model_type
        calls.clear()


def test_an_axolotl_that_builds_no_bitsandbytes_config_for_lora_is_an_error(monkeypatch):
    monkeypatch.setattr(ModelLoader, "_set_quantization_config", lambda self: None)  # the host's code changed
    with pytest.raises(HostChanged) as error:
        built_quantization("rlora", 4, "llama")
    message = str(error.value)
    assert (
        f"axolotl {version('axolotl')} does not provide" in message
        and "checked with axolotl 0.19.0 and 0.21.0" in message
    )
    assert "`ModelLoader._set_quantization_config` to build the bitsandbytes config for `adapter: qlora`" in message


def test_a_missing_method_is_named_with_the_versions_checked(monkeypatch):
    monkeypatch.delattr(ModelLoader, "_prepare_model_for_quantization")
    with pytest.raises(
        HostChanged, match=r"needs `axolotl\.loaders\.model\.ModelLoader\._prepare_model_for_quantization`"
    ):
        quantization.patch_model_loader()


def test_the_device_mesh_is_read_and_rewritten_by_parameter_name():
    seen = []

    def build_device_mesh(self, device_type: str):
        seen.append(device_type)

    wrapped = cpu_distributed.cpu_device_mesh(build_device_mesh)
    wrapped(None, "cuda")
    wrapped(None, device_type="cuda")
    wrapped(None, "xpu")
    assert seen == ["cpu", "cpu", "xpu"]


def test_the_fsdp_plugin_is_read_by_name_wherever_accelerate_puts_it(monkeypatch):
    from accelerate.utils import DistributedType

    switched = []
    monkeypatch.setattr(cpu_distributed, "switch_to_fsdp", lambda state, plugin: switched.append(plugin))

    def reordered(self, fsdp_plugin=None, mixed_precision=None, cpu=False, **kwargs):  # a later accelerate, say
        self.distributed_type = DistributedType.MULTI_CPU

    init = cpu_distributed.fsdp_on_cpu(reordered)
    init(SimpleNamespace(), "plugin")
    init(SimpleNamespace(), mixed_precision="bf16", fsdp_plugin="by name")
    init(SimpleNamespace(), None, "bf16")
    init(SimpleNamespace())  # left out: its default
    assert switched == ["plugin", "by name"]


def test_an_accelerate_without_the_fsdp_plugin_parameter_is_refused(monkeypatch):
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState

    def changed(self, mixed_precision=None, cpu=False, **kwargs):
        pass

    monkeypatch.setattr(AcceleratorState, "__init__", changed)
    monkeypatch.setattr(ParallelismConfig, "build_device_mesh", ParallelismConfig.build_device_mesh)
    with pytest.raises(HostChanged) as error:
        cpu_distributed.patch_cpu_fsdp()
    message = str(error.value)
    assert "`accelerate.state.AcceleratorState.__init__` to take the parameter(s) 'fsdp_plugin'" in message
    assert f"accelerate {version('accelerate')} does not provide" in message and "1.13.0 and 1.15.0" in message


def test_switching_to_fsdp_checks_accelerates_private_state_first(monkeypatch):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(set_mixed_precision=lambda precision: None)
    shared = {"distributed_type": DistributedType.MULTI_CPU}
    monkeypatch.setattr(PartialState, "_shared_state", shared)
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, _mixed_precision="no")
    cpu_distributed.switch_to_fsdp(state, plugin)
    assert state.distributed_type == shared["distributed_type"] == DistributedType.FSDP and state.fsdp_plugin is plugin

    with pytest.raises(HostChanged, match=r"`types\.SimpleNamespace\._mixed_precision` as a str \(it is missing\)"):
        cpu_distributed.switch_to_fsdp(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), plugin)
    monkeypatch.setattr(PartialState, "_shared_state", {})
    with pytest.raises(
        HostChanged, match=r"`PartialState\._shared_state` to hold the initialized state's distributed_type"
    ):
        cpu_distributed.switch_to_fsdp(state, plugin)
    monkeypatch.delattr(PartialState, "_shared_state")
    with pytest.raises(
        HostChanged, match=r"`accelerate\.state\.PartialState\._shared_state` as a dict \(it is missing\)"
    ):
        cpu_distributed.switch_to_fsdp(state, plugin)


def test_the_backend_wrapper_passes_every_argument_on_and_checks_the_result(monkeypatch):
    from accelerate.utils import DistributedType

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    calls = []

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        calls.append((cpu, sagemaker_dp, backend))
        return None, DistributedType.NO

    assert cpu_distributed.gloo_backend(prepare_backend)(None, backend="x") == ("gloo", DistributedType.MULTI_CPU)
    assert calls == [(False, False, "x")]
    with pytest.raises(HostChanged, match="to return"):
        cpu_distributed.gloo_backend(lambda self, *a, **k: None)(None)


def test_wrap_once_wraps_once():
    class Host:
        def method(self, value):
            return value

    wrap_once(Host, "method", lambda original: lambda self, value: original(self, value) + 1, cpu_distributed.CHECKED)
    wrap_once(Host, "method", lambda original: lambda self, value: original(self, value) + 1, cpu_distributed.CHECKED)
    assert Host().method(1) == 2 and inspect.signature(Host.method) == inspect.signature(lambda self, value: 0)


def test_bnb_config_kwargs_with_8bit_is_ignored_as_axolotl_ignores_it_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger=LOG.logger.name):
        built = built_quantization("rlora", 8, "llama", bnb_config_kwargs={"llm_int8_threshold": 5.0})
    assert built == built_quantization("lora", 8, "llama", bnb_config_kwargs={"llm_int8_threshold": 5.0})
    assert built["llm_int8_threshold"] == 6.0 and "`bnb_config_kwargs` is ignored with `load_in_8bit`" in caplog.text
