"""Fast checks of the R-LoRA Axolotl plugin: config validation and the adapter hook, without training."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

import torch  # noqa: E402
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl_validation import make_cfg, validated  # noqa: E402
from hub_cache import cache_as_downloaded  # noqa: E402
from peft import PeftModel  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from rlora_plugin import RLoraConfig  # noqa: E402
from rlora_plugin.axolotl_plugin.args import RLoraArgs, RLoraOptions, build_rlora_config  # noqa: E402
from rlora_plugin.axolotl_plugin.plugin import RLoraPlugin  # noqa: E402
from rlora_plugin.errors import HostChanged  # noqa: E402


def refused(cfg: dict) -> str:
    with pytest.raises((ValidationError, ValueError)) as info:
        validated(cfg)
    return str(info.value)


def test_schema_adds_only_the_rlora_block():
    assert set(RLoraArgs.model_fields) == {"rlora"}  # Axolotl's lora_* / peft_* keys are not redeclared
    assert RLoraOptions.model_config["extra"] == "forbid"
    defaults = RLoraOptions()
    assert (defaults.num_heads, defaults.init, defaults.init_gamma) == (5, "random", 64.0)
    assert (defaults.head_dropout, defaults.router_init, defaults.router_temperature) == (
        "per_head",
        "zero",
        1.0,
    )
    assert defaults.init_seed is None
    assert (defaults.router_top_k, defaults.router_aux_loss_coef, defaults.metrics) == (None, 0.0, True)
    for name, field in RLoraOptions.model_fields.items():
        assert field.description, name


def test_rlora_block_is_rlora_configs_rlora_fields():
    """The `rlora:` block declares exactly `RLoraConfig`'s R-LoRA fields (plus `metrics`), each with the config's
    type, default and help text; `init_seed` (Source.RUN_SEED) may also be unset, meaning the run's seed."""
    from rlora_plugin.config import Source, field_source, fields_from, own_field_types

    block = dict(RLoraOptions.model_fields)
    assert block.pop("metrics").annotation is bool
    assert set(block) == set(fields_from(Source.RLORA, Source.RUN_SEED))
    for name, field in block.items():
        spec = RLoraConfig.__dataclass_fields__[name]
        assert field.description.startswith(spec.metadata["help"]), name
        if field_source(name) is Source.RUN_SEED:
            assert (field.annotation, field.default) == (own_field_types()[name] | None, None), name
        else:
            assert (field.annotation, field.default) == (own_field_types()[name], spec.default), name


def test_every_config_field_is_classified_once():
    """Every field `RLoraConfig` declares has one `Source` and one `Role` (or None: only a new adapter's); each host
    key maps to one field; every `Role` is read by a host (no member nothing reads)."""
    from rlora_plugin.axolotl_plugin.args import HOST
    from rlora_plugin.config import Role, Source, fields_from, fields_with_role, own_field_types

    fields = list(own_field_types())
    for name in fields:
        metadata = RLoraConfig.__dataclass_fields__[name].metadata
        assert isinstance(metadata["source"], Source) and isinstance(metadata["role"], (Role, type(None))), name
    assert sorted(n for source in Source for n in fields_from(source)) == sorted(fields)
    assert sorted(n for role in (*Role, None) for n in fields_with_role(role)) == sorted(fields)
    assert set(Role) == {Role.FORWARD, Role.TRAINING}  # read by `host.adopt_saved_config`
    assert fields_with_role(Role.TRAINING) == ("router_aux_loss_coef",)
    assert set(HOST.lora_keys) == set(fields_from(Source.LORA))  # Axolotl has a key for every LoRA field
    keys = [HOST.key(name) for name in fields if name != "init_weights"]
    assert len(set(keys)) == len(keys)
    with pytest.raises(TypeError, match="source must be a Source"):
        from rlora_plugin.config import option

        option(1, "help", source="lora", role=Role.FORWARD)


def test_valid_config_defaults_and_no_lora_kernels(tiny):
    cfg = validated(make_cfg(tiny, seed=11))
    assert cfg.adapter == "rlora"
    assert cfg.rlora["num_heads"] == 5 and cfg.rlora["init"] == "random"
    # Axolotl auto-enables its fused LoRA kernels only for adapter lora/qlora: never for rlora.
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel"):
        assert not cfg.get(key), key
    peft_cfg = build_rlora_config(cfg)
    assert isinstance(peft_cfg, RLoraConfig)
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, peft_cfg.num_heads) == (4, 8, 0.1, 5)
    assert peft_cfg.target_modules == "all-linear"
    assert peft_cfg.init_seed == 11  # defaults to the run's seed


def test_rlora_block_values_reach_the_peft_config(tiny):
    block = {
        "num_heads": 3,
        "init": "zero",
        "init_gamma": 16,
        "head_dropout": "shared",
        "router_init": "kaiming",
        "router_temperature": 2.0,
        "init_seed": 5,
        "router_top_k": 2,
        "router_aux_loss_coef": 0.01,
    }
    cfg = validated(
        make_cfg(
            tiny,
            rlora=block,
            seed=11,
            lora_target_linear=None,
            lora_target_modules=["q_proj", "v_proj"],
            peft_layers_to_transform=[1],
            peft_use_rslora=True,
            lora_modules_to_save=["lm_head"],
        )
    )
    peft_cfg = build_rlora_config(cfg)
    for key, value in block.items():
        assert getattr(peft_cfg, key) == value, key
    assert peft_cfg.target_modules == {"q_proj", "v_proj"}
    assert peft_cfg.layers_to_transform == [1] and peft_cfg.use_rslora is True
    assert set(peft_cfg.modules_to_save) == {"lm_head"}
    assert build_rlora_config(validated(make_cfg(tiny))).init_seed == 0  # no seed at all


@pytest.mark.parametrize(
    "overrides, key, explained",
    [
        ({"merge_lora": True}, "merge_lora", ["router", "Fix: remove `merge_lora`; do not run `axolotl merge-lora`"]),
        ({"gptq": True}, "gptq", []),
        ({"lora_mlp_kernel": True}, "lora_mlp_kernel", []),
        ({"lora_qkv_kernel": True}, "lora_qkv_kernel", []),
        ({"lora_o_kernel": True}, "lora_o_kernel", []),
        ({"lora_embedding_kernel": True}, "lora_embedding_kernel", []),
        ({"relora": True, "jagged_restart_steps": 10}, "relora", []),
        ({"peft_use_dora": True}, "peft_use_dora", []),
        ({"lora_rank_pattern": {"q_proj": 8}}, "lora_rank_pattern", []),
        ({"lora_target_parameters": ["experts.gate_up_proj"], "lora_dropout": 0.0}, "lora_target_parameters", []),
    ],
)
def test_incompatible_options_are_refused(tiny, overrides, key, explained):
    """Each refusal names the key and a fix; `explained`: what else it must say (the merge: why, and that
    `axolotl merge-lora` is refused too)."""
    message = refused(make_cfg(tiny, **overrides))
    assert f"adapter: rlora: `{key}: {overrides[key]!r}` is not supported: " in message
    assert f"Fix: remove `{key}`" in message or f"Fix: set `{key}: false`" in message
    for text in explained:
        assert text in message, text


def test_kernels_explicitly_off_are_fine(tiny):
    validated(make_cfg(tiny, lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False))


@pytest.mark.parametrize(
    "overrides, key, value, fix",
    [
        ({"rlora": {"num_heads": 0}}, "rlora.num_heads", "0", "use an integer >= 1"),
        ({"rlora": {"init_gamma": 0}}, "rlora.init_gamma", "0", "gamma must be a finite number > 0"),
        ({"rlora": {"init_gamma": float("inf")}}, "rlora.init_gamma", "inf", "gamma must be a finite number > 0"),
        ({"rlora": {"router_temperature": float("inf")}}, "rlora.router_temperature", "inf", "the softmax"),
        ({"rlora": {"init_seed": -1}}, "rlora.init_seed", "-1", "the seed must be an integer >= 0"),
        ({"lora_alpha": 0}, "lora_alpha", "0", "the update is scaled by lora_alpha / r"),
        ({"lora_alpha": -16}, "lora_alpha", "-16", "the update is scaled by lora_alpha / r"),
        ({"rlora": {"router_temperature": -1}}, "rlora.router_temperature", "-1", "the softmax temperature"),
        (
            {"rlora": {"num_heads": 3, "router_top_k": 4}},
            "rlora.router_top_k",
            "4",
            "use an integer in [1, num_heads=3]",
        ),
        ({"rlora": {"router_aux_loss_coef": -0.1}}, "rlora.router_aux_loss_coef", "-0.1", "the loss weight must be"),
        ({"lora_r": 0}, "lora_r", "0", "the rank must be an integer >= 1"),
        ({"lora_dropout": 1.5}, "lora_dropout", "1.5", "the dropout rate must be in [0, 1)"),
        (  # the fix names Axolotl's key for `target_modules`
            {"lora_target_linear": None, "lora_target_modules": ".*proj", "peft_layers_to_transform": [0]},
            "peft_layers_to_transform",
            "[0]",
            "it cannot be combined with a regex `lora_target_modules`",
        ),
    ],
)
def test_bad_values_use_rlora_config_validation(tiny, overrides, key, value, fix):
    message = refused(make_cfg(tiny, **overrides))
    assert f"adapter: rlora: `{key}: {value}` is invalid. Fix: {fix}" in message  # RLoraConfig's fix


@pytest.mark.parametrize(
    "overrides, key, shown",
    [
        ({"rlora": {"init": "gaussian"}}, "rlora.init", ["'gaussian'", "choose one of 'random', 'zero'"]),
        ({"rlora": {"head_dropout": "all"}}, "rlora.head_dropout", ["'all'", "choose one of 'per_head', 'shared'"]),
        ({"rlora": {"router_init": "xavier"}}, "rlora.router_init", ["'xavier'", "choose one of 'zero', 'kaiming'"]),
        ({"rlora": {"num_heads": True}}, "rlora.num_heads", ["True", "use an integer (not a string"]),
        ({"rlora": {"init_gamma": "64"}}, "rlora.init_gamma", ["'64'", "use a number (not a string"]),
        ({"rlora": {"init_seed": 1.5}}, "rlora.init_seed", ["1.5", "use an integer"]),
        ({"rlora": {"metrics": "yes"}}, "rlora.metrics", ["'yes'", "use true or false"]),
    ],
)
def test_rlora_block_types_are_strict(tiny, overrides, key, shown):
    """Choices and types come from RLoraConfig's annotations and are checked once, by RLoraConfig, in the shape
    of every refusal; no coercion (`num_heads: true` is not 1 head)."""
    value, fix = shown
    message = refused(make_cfg(tiny, **overrides))
    assert f"adapter: rlora: `{key}: {value}` is invalid. Fix: {fix}" in message
    assert len(message.split(f"`{key}:")) == 2  # one error, not pydantic's besides


def test_rlora_keys_outside_the_block_are_refused(tiny):
    message = refused(make_cfg(tiny, num_heads=3))
    assert "adapter: rlora: `num_heads: 3` is an R-LoRA setting written at the top level" in message
    assert "Fix: move it into the `rlora:` block as `rlora.num_heads`" in message
    message = refused(make_cfg(tiny, router_top_k=1))
    assert "`rlora.router_top_k`" in message


def test_both_quantizations_are_refused(tiny):
    message = refused(make_cfg(tiny, load_in_4bit=True, load_in_8bit=True))
    assert "`load_in_8bit: True` cannot be combined with `load_in_4bit: true`. Fix: keep one" in message


def test_lora_model_dir_is_checked_at_validation(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for missing in (str(tmp_path / "nowhere"), "someone/not-downloaded"):
        message = refused(make_cfg(tiny, lora_model_dir=missing))
        assert f"`lora_model_dir: {missing!r}` is neither a local directory nor an adapter on the model hub" in message
        assert "Fix: point `lora_model_dir` at the output directory of an `adapter: rlora` run" in message
    plain = tmp_path / "plain"
    plain.mkdir()
    message = refused(make_cfg(tiny, lora_model_dir=str(plain)))
    assert "holds no adapter_config.json" in message
    (plain / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    message = refused(make_cfg(tiny, lora_model_dir=str(plain)))
    assert f"`lora_model_dir: {str(plain)!r}` holds a LORA adapter" in message and "RLORA" in message
    assert "a plain LoRA adapter is loaded with `adapter: lora`" in message
    # A model-hub id is read as PEFT loads it (here from the hub cache, offline).
    cache_as_downloaded(plain, "someone/plain-lora", tmp_path / "hub")
    message = refused(make_cfg(tiny, lora_model_dir="someone/plain-lora"))
    assert "`lora_model_dir: 'someone/plain-lora'` holds a LORA adapter" in message


def test_lora_model_dir_under_dpo_is_refused(tiny, tmp_path):
    """Axolotl's DPO path never loads `lora_model_dir`: refuse instead of ignoring it."""
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "RLORA"}')
    message = refused(make_cfg(tiny, rl="dpo", lora_model_dir=str(tmp_path)))
    assert f"`lora_model_dir: {str(tmp_path)!r}` is not loaded with `rl: dpo`" in message
    assert "Fix: remove `lora_model_dir`" in message


def test_metrics_switch_and_routing_defaults(tiny):
    from rlora_plugin.axolotl_plugin.args import rlora_options

    assert rlora_options(validated(make_cfg(tiny, rlora={"metrics": False}))).metrics is False
    peft_cfg = build_rlora_config(validated(make_cfg(tiny, rlora={"router_top_k": 0})))
    assert peft_cfg.router_top_k is None and peft_cfg.router_aux_loss_coef == 0.0  # 0 means dense


def test_aux_loss_with_reentrant_checkpointing_is_refused(tiny):
    message = refused(
        make_cfg(
            tiny,
            rlora={"router_aux_loss_coef": 0.01},
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
    )
    assert (
        "`gradient_checkpointing_kwargs.use_reentrant: True` does not work with `rlora.router_aux_loss_coef`" in message
    )
    assert "Fix: set `use_reentrant: false`" in message


def test_aux_loss_asks_for_non_reentrant_checkpointing_with_a_warning(tiny, caplog):
    """Unset, non-reentrant is asked for (Axolotl 0.19 would default to reentrant), and the change of the user's
    setting is logged with the key, the old and the new value."""
    with caplog.at_level("WARNING"):
        cfg = validated(make_cfg(tiny, rlora={"router_aux_loss_coef": 0.01}, gradient_checkpointing=True))
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}
    (warning,) = [r.getMessage() for r in caplog.records if "gradient_checkpointing_kwargs" in r.getMessage()]
    assert "`gradient_checkpointing_kwargs` changed from None to {'use_reentrant': False}" in warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        cfg = validated(
            make_cfg(
                tiny,
                rlora={"router_aux_loss_coef": 0.01},
                gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"preserve_rng_state": False},
            )
        )
    assert cfg.gradient_checkpointing_kwargs == {"preserve_rng_state": False, "use_reentrant": False}
    (warning,) = [r.getMessage() for r in caplog.records if "gradient_checkpointing_kwargs" in r.getMessage()]
    assert "from {'preserve_rng_state': False} to {'preserve_rng_state': False, 'use_reentrant': False}" in warning
    caplog.clear()
    with caplog.at_level("WARNING"):  # the user's own non-reentrant setting is kept, without a word
        validated(
            make_cfg(
                tiny,
                rlora={"router_aux_loss_coef": 0.01},
                gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        )
    assert not [r for r in caplog.records if "gradient_checkpointing_kwargs" in r.getMessage()]


def test_misspelled_rlora_key_is_an_error(tiny):
    message = refused(make_cfg(tiny, rlora={"num_head": 3}))
    assert "adapter: rlora: `rlora.num_head: 3` is not an R-LoRA key. Fix: did you mean `rlora.num_heads`?" in message
    message = refused(make_cfg(tiny, rlora={"completely_unrelated": 1}))
    assert (
        "`rlora.completely_unrelated: 1` is not an R-LoRA key. Fix: the R-LoRA keys are rlora.head_dropout, " in message
    )


def test_wrong_type_in_rlora_block(tiny):
    message = refused(make_cfg(tiny, rlora={"num_heads": "five"}))
    assert "rlora.num_heads" in message


def test_missing_plugin_fails_clearly(tiny):
    manager = PluginManager.get_instance()
    saved = dict(manager.plugins)
    manager.plugins.clear()  # a fresh process: nothing registered yet
    try:
        message = refused(make_cfg(tiny, plugins=None))
    finally:
        manager.plugins.update(saved)
    assert "Adapter 'rlora' is not built in and was not registered by a plugin" in message
    assert "plugins:" in message


def test_other_adapters_are_untouched(tiny):
    # merge_lora etc. stay legal for adapter: lora even with the plugin listed
    cfg = validated(make_cfg(tiny, adapter="lora", merge_lora=True, rlora={"num_heads": 0}))
    assert cfg.adapter == "lora"
    plugin = RLoraPlugin()
    assert plugin.load_adapter(torch.nn.Linear(2, 2), cfg) is None
    assert plugin.pre_model_load(cfg) is None
    caps = plugin.get_adapter_capabilities()
    assert [(c.name, c.lora_like, c.relora) for c in caps] == [("rlora", False, False)]


@pytest.fixture()
def base_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny["model"])


def test_load_adapter_fresh_and_config_only(tiny, base_model):
    cfg = validated(make_cfg(tiny, rlora={"num_heads": 3}, seed=3))
    plugin = RLoraPlugin()
    none, only_config = plugin.load_adapter(base_model, cfg, config_only=True)
    assert none is None and isinstance(only_config, RLoraConfig)
    model, peft_cfg = plugin.load_adapter(base_model, cfg)
    assert isinstance(model, PeftModel) and peft_cfg.peft_type == "RLORA"
    assert peft_cfg.task_type == "CAUSAL_LM" and peft_cfg.init_seed == 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".rlora_")[0] for n in trainable}
    assert len(adapted) == 14  # all 7 linear layers x 2 decoder layers; not lm_head
    assert all(".rlora_A." in n or ".rlora_B." in n or ".rlora_router." in n for n in trainable)
    ids = torch.tensor([[1, 5, 9, 13]])
    model.eval()
    with torch.no_grad():
        adapted_out = model(input_ids=ids).logits
        with model.disable_adapter():
            base_out = model(input_ids=ids).logits
    torch.testing.assert_close(adapted_out, base_out, atol=1e-5, rtol=1e-5)  # init equals the base


def test_a_local_base_model_is_recorded_as_an_absolute_path(tiny, monkeypatch):
    """The adapter must find its base from any working directory (AutoPeftModelForCausalLM reads it); the base
    is loaded from the relative path, as Axolotl loads it, and PEFT does not warn that the path "was renamed"."""
    import warnings

    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tiny["model"].parent)
    cfg = validated(make_cfg(tiny, base_model=tiny["model"].name))
    base_model = AutoModelForCausalLM.from_pretrained(tiny["model"].name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, peft_cfg = RLoraPlugin().load_adapter(base_model, cfg)
    assert not [w for w in caught if "was renamed" in str(w.message)], [str(w.message) for w in caught]
    assert peft_cfg.base_model_name_or_path == str(tiny["model"].resolve())
    assert RLoraPlugin().load_adapter(base_model, cfg, config_only=True)[1].base_model_name_or_path == str(
        tiny["model"].resolve()
    )


def test_target_linear_plus_modules_is_the_union(tiny, base_model):
    cfg = validated(make_cfg(tiny, lora_target_modules=["lm_head"]))
    _, peft_cfg = RLoraPlugin().load_adapter(base_model, cfg)
    assert "lm_head" in peft_cfg.target_modules and "q_proj" in peft_cfg.target_modules


def test_load_adapter_from_lora_model_dir(tiny, base_model, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = validated(make_cfg(tiny, rlora={"num_heads": 2}))
    model, _ = RLoraPlugin().load_adapter(base_model, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rlora_router" in name:
                param.normal_()  # make the saved adapter differ from a fresh one
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    # the config disagrees with the saved adapter: the saved one wins (with a warning)
    cfg = validated(make_cfg(tiny, rlora={"num_heads": 4}, lora_model_dir=str(tmp_path / "adapter")))
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    loaded, peft_cfg = RLoraPlugin().load_adapter(fresh_base, cfg)
    assert peft_cfg.num_heads == 2
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "rlora_B" in n)  # trainable
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)

    frozen, _ = RLoraPlugin().load_adapter(AutoModelForCausalLM.from_pretrained(tiny["model"]), cfg, inference=True)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_lora_model_dir_warns_for_every_setting_that_defines_the_adapter(tiny, tmp_path, caplog):
    """The warning lists every forward-defining field that disagrees (derived from RLoraConfig, not typed);
    training-only settings (the aux-loss weight) follow this run's config; init-only ones are not compared."""
    from transformers import AutoModelForCausalLM

    from rlora_plugin.config import Role, fields_with_role

    assert set(fields_with_role(Role.FORWARD)) >= {"router_temperature", "lora_dropout", "num_heads", "router_top_k"}
    saved_cfg = validated(make_cfg(tiny, rlora={"num_heads": 3}))
    model, _ = RLoraPlugin().load_adapter(AutoModelForCausalLM.from_pretrained(tiny["model"]), saved_cfg)
    model.save_pretrained(tmp_path / "adapter")
    block = {"num_heads": 3, "router_temperature": 2.0, "router_init": "kaiming", "router_aux_loss_coef": 0.25}
    cfg = validated(make_cfg(tiny, rlora=block, lora_dropout=0.2, lora_model_dir=str(tmp_path / "adapter")))
    with caplog.at_level("WARNING"):
        _, peft_cfg = RLoraPlugin().load_adapter(AutoModelForCausalLM.from_pretrained(tiny["model"]), cfg)
    warning = "\n".join(r.getMessage() for r in caplog.records if "governs these settings" in r.getMessage())
    assert "router_temperature: run 2.0, saved 1.0" in warning and "lora_dropout: run 0.2, saved 0.1" in warning
    assert "router_init" not in warning and "num_heads" not in warning  # init-only; equal
    assert peft_cfg.router_temperature == 1.0 and peft_cfg.router_aux_loss_coef == 0.25


class FakeTrainer:
    """What the plugin's callback and loss wrapper use of an AxolotlTrainer (`from_logits`: of a TRL preference
    trainer, which calls the model without labels and computes its loss from the logits)."""

    def __init__(self, model, from_logits=False):
        self.model = model
        self.from_logits = from_logits
        self.model_accepts_loss_kwargs = not from_logits
        self.compute_loss_func = None
        self.stored = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.logits.mean() if self.from_logits else outputs.loss
        return (loss, outputs) if return_outputs else loss

    def store_metrics(self, metrics, train_eval="train"):
        self.stored.append((dict(metrics), train_eval))


def test_plugin_callback_logs_the_aux_loss_and_preference_trainers_get_it(tiny, base_model):
    from types import SimpleNamespace

    block = {"num_heads": 3, "router_init": "kaiming", "router_aux_loss_coef": 0.5}
    cfg = validated(make_cfg(tiny, rlora=block, lora_dropout=0.0))  # no dropout: repeated forwards agree
    plugin = RLoraPlugin()
    model, _ = plugin.load_adapter(base_model, cfg)
    model.train()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    inputs = {"input_ids": ids, "labels": ids}
    with torch.no_grad():  # no gradients: no load-balancing loss
        plain, logits = model(**inputs).loss, model(input_ids=ids).logits.mean()
    trainer = FakeTrainer(model)
    (callback,) = plugin.add_callbacks_post_trainer(cfg, trainer)
    assert "compute_loss" not in vars(trainer)  # SFT: the model adds the loss itself, nothing is wrapped
    callback.on_train_begin(None, None, None)
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    aux = float(loss.detach() - plain) / 0.5
    assert aux >= 1.0  # N * sum f_i P_i >= 1

    callback.on_step_end(None, None, SimpleNamespace(should_log=False))
    assert trainer.stored == []
    callback.on_step_end(None, None, SimpleNamespace(should_log=True))
    ((metrics, bucket),) = trainer.stored
    assert bucket == "train" and metrics["rlora/aux_loss"] == pytest.approx(aux, abs=1e-5)
    from rlora_plugin.metrics import similarity_metrics

    for key, value in similarity_metrics(model).items():  # the weights' head similarities, as logged
        assert metrics[key] == pytest.approx(value), key
    assert 0 < metrics["rlora/router_entropy"] < 1  # a Kaiming router is not uniform
    heads = model.peft_config["default"].num_heads
    assert 1 / heads < metrics["rlora/head_load_max"] < 1
    assert 1 < metrics["rlora/head_load_ratio"] <= metrics["rlora/head_load_ratio_worst"]
    callback.on_train_end(None, None, None)

    from transformers import AutoModelForCausalLM

    off = validated(make_cfg(tiny, rlora={"metrics": False}))  # and no aux loss: the model's config says 0
    off_model, _ = plugin.load_adapter(AutoModelForCausalLM.from_pretrained(tiny["model"]), off)
    assert plugin.add_callbacks_post_trainer(off, FakeTrainer(off_model)) == []
    assert plugin.add_callbacks_post_trainer(validated(make_cfg(tiny, adapter="lora")), FakeTrainer(model)) == []

    # A preference trainer (rl): the model returns no loss; the plugin's wrapper adds the one the forward kept.
    cfg.rl = "dpo"
    preference = FakeTrainer(model, from_logits=True)
    plugin.add_callbacks_post_trainer(cfg, preference)
    loss = preference.compute_loss(model, {"input_ids": ids})
    assert float(loss.detach() - logits) == pytest.approx(0.5 * aux, abs=1e-5)
    assert model.base_model.pop_unadded_aux_loss() is None  # taken
    with pytest.raises(HostChanged, match=r"weighted like it.*Fix: set `rlora.router_aux_loss_coef: 0`"):
        plugin.add_callbacks_post_trainer(cfg, FakeTrainer(model))  # one whose loss the HF Trainer does not divide


def test_fsdp2_full_state_dict_resume_is_refused_before_axolotl_021(tiny, tmp_path):
    """Axolotl 0.19 would resume an FSDP2 FULL_STATE_DICT checkpoint without its adapter weights."""
    from importlib.metadata import version

    from packaging.version import Version

    fsdp = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}}
    cfg = make_cfg(tiny, **fsdp, resume_from_checkpoint=str(tmp_path))
    if Version(version("axolotl")) < Version("0.21"):
        message = refused(cfg)
        assert "`fsdp_config.state_dict_type: 'FULL_STATE_DICT'`" in message and "not the adapter weights" in message
        assert "Fix: checkpoint with `fsdp_config.state_dict_type: SHARDED_STATE_DICT`" in message
    else:
        validated(cfg)
    sharded = {**fsdp, "fsdp_config": {**fsdp["fsdp_config"], "state_dict_type": "SHARDED_STATE_DICT"}}
    validated(make_cfg(tiny, **sharded, resume_from_checkpoint=str(tmp_path)))
