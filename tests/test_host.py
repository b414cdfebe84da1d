"""The host-neutral core (`rlora_plugin.host`) on a made-up third host: what a new host gets from a `Host`."""

from __future__ import annotations

import pytest

from rlora_plugin import RLoraConfig
from rlora_plugin.host import REFUSALS, Host, HostConfigError, absolute_base

TOY = Host(
    name="Toy",
    selector="method: rlora",
    plain_lora="method: lora",
    lora_keys={"r": "rank", "lora_alpha": "alpha", "target_modules": "targets", "layers_to_transform": "layers"},
    rlora_prefix="rlora-",
    adapter_key="adapter",
    merge_fix="serve it unmerged",
    refused={"dora": "dora", "merge": "merge", "init_lora": "lora_init"},
    refused_patterns={r"fused_\w+": "fused_lora_kernels"},
)


def test_keys_are_named_by_the_host():
    assert (TOY.key("r"), TOY.key("num_heads"), TOY.key("init_seed")) == ("rank", "rlora-num_heads", "rlora-init_seed")
    assert TOY.rlora_keys()["rlora-router_top_k"] == "router_top_k"
    assert "rlora-r" not in TOY.rlora_keys() and "rlora-init_weights" not in TOY.rlora_keys()


def test_build_config_from_the_hosts_settings():
    config = TOY.build_config({"r": 4, "lora_alpha": None, "num_heads": 3}, run_seed=11, task_type="CAUSAL_LM")
    assert isinstance(config, RLoraConfig)
    assert (config.r, config.lora_alpha, config.num_heads, config.init_seed) == (4, 16, 3, 11)  # None: default
    assert TOY.build_config({"init_seed": 2}, run_seed=11).init_seed == 2  # set: the run's seed does not apply
    assert TOY.build_config({}).init_seed == 0
    with pytest.raises(TypeError, match=r"no host key for \['lora_dropout'\]"):  # a host without the key
        TOY.build_config({"lora_dropout": 0.2})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"r": 0}, "method: rlora: `rank: 0` is invalid. Fix: the rank must be an integer >= 1, e.g. 8."),
        ({"num_heads": True}, "method: rlora: `rlora-num_heads: True` is invalid. Fix: use an integer"),
        (  # an RLoraConfig field named in the fix is renamed to the host's key
            {"target_modules": ".*proj", "layers_to_transform": [0]},
            "`layers: [0]` is invalid. Fix: it cannot be combined with a regex `targets`; list the names.",
        ),
    ],
)
def test_invalid_values_name_the_hosts_key_value_and_fix(settings, message):
    with pytest.raises(HostConfigError) as info:
        TOY.build_config(settings)
    assert message in str(info.value)
    assert info.value.key in str(info.value) and info.value.fix


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"dora": True},
            "method: rlora: `dora: True` is not supported: DoRA is a variant of plain LoRA; R-LoRA has no magnitude "
            "vector. Fix: remove `dora`, or use `method: lora`.",
        ),
        ({"init_lora": "pissa"}, "Fix: remove `init_lora` and choose `rlora-init` ('random' or 'zero')."),
        ({"merge": 1}, "`merge: 1` is not supported: R-LoRA adapters cannot be merged"),
        ({"fused_mlp": True}, "Toy's fused LoRA kernels compute plain LoRA's forward"),
        ({"fused_mlp": True}, "Fix: set `fused_mlp: false` or remove it (Toy never auto-enables them for `method"),
    ],
)
def test_plain_lora_features_are_refused_from_one_table(config, message):
    with pytest.raises(HostConfigError) as info:
        TOY.refuse_plain_lora_features({"rank": 8, "dora": False, **config})
    assert message in str(info.value)


def test_features_off_pass_and_a_host_names_only_known_features():
    TOY.refuse_plain_lora_features({"dora": False, "merge": None, "fused_mlp": False, "other": True})
    assert {"dora", "merge", "loraplus", "fused_lora_kernels"} <= set(REFUSALS)
    with pytest.raises(ValueError, match="unknown features"):
        Host("Bad", "m: rlora", "m: lora", {}, "rlora-", "a", "fix", refused={"x": "not_a_feature"})
    with pytest.raises(ValueError, match="not LoRA fields"):
        Host("Bad", "m: rlora", "m: lora", {"num_heads": "heads"}, "rlora-", "a", "fix")


def test_a_local_base_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert absolute_base("base") == str((tmp_path / "base").resolve())
    assert absolute_base("org/model") is None and absolute_base(None) is None
