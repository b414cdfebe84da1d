"""PEFT's own tuner tests, run against RLORA.

The test suite of the installed peft version is fetched from its sdist (tests/peft_upstream.py; the run fails,
never skips, if it cannot be fetched). PEFT's testers are subclassed here and their tests re-parametrized
with RLORA cases in place of PEFT's methods:

- `TestPeftCustomModel` (test_custom_models.py): PEFT's small local models (MLP, DeepMLP), no hub.
- `TestDecoderModels` (test_decoder_models.py): its model ids are hub models, so they are replaced by a tiny
  random Llama saved locally (`peft_upstream.tiny_causal_lm`).
- `TestMultipleActiveAdapters.test_multiple_active_adapters_forward`: two RLORA adapters active at once.

Merging is refused by design (an R-LoRA update depends on each token's gates): the merge tests are run and
must raise `MERGE_REFUSAL` (`MERGE_REFUSED`). Every test left out is in `LEFT_OUT` with the reason; besides
those, tests that take none of the replaced parameters build a fixed config of another method (LoRA, IA3,
DoRA, trainable tokens, ...) and are not collected.
"""

from __future__ import annotations

import functools
import re

import peft_upstream
import pytest
from peft import PeftModel

from rlora_plugin import RLoraConfig
from rlora_plugin.errors import ConfigError
from rlora_plugin.layer import MERGE_REFUSAL

try:
    custom = peft_upstream.load("test_custom_models")
    decoder = peft_upstream.load("test_decoder_models")
    FETCH_ERROR = None
except Exception as error:  # reported by test_peft_test_suite_is_fetched, so the run fails instead of skipping
    custom = decoder = None
    FETCH_ERROR = error


def test_peft_test_suite_is_fetched():
    assert FETCH_ERROR is None, f"PEFT's test suite could not be loaded: {FETCH_ERROR}"
    assert custom.PeftModel is PeftModel  # the installed peft's tests, run against the installed peft


MLP_CASES = [
    # (test id, PEFT's custom model id, config class, config kwargs)
    ("MLP 1 RLoRA", "MLP", RLoraConfig, {"target_modules": "lin0"}),
    ("MLP 2 RLoRA", "MLP", RLoraConfig, {"target_modules": ["lin0", "lin1"]}),
    ("MLP 3 RLoRA modules_to_save", "MLP", RLoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("MLP 4 RLoRA one head", "MLP", RLoraConfig, {"target_modules": ["lin0", "lin1"], "num_heads": 1}),
    (
        "MLP 5 RLoRA HydraLoRA",
        "MLP",
        RLoraConfig,
        {"target_modules": ["lin0", "lin1"], "init": "zero", "head_dropout": "shared", "router_init": "kaiming"},
    ),
    (
        "MLP 6 RLoRA top-k rsLoRA",
        "MLP",
        RLoraConfig,
        {"target_modules": ["lin0"], "router_top_k": 2, "router_temperature": 0.5, "use_rslora": True, "r": 4},
    ),
]

DECODER_CONFIGS = [
    (RLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "num_heads": 3, "r": 4}),
    (RLoraConfig, {"task_type": "CAUSAL_LM", "target_modules": "all-linear", "num_heads": 1, "init": "zero"}),
]

# Two adapters active at once (PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): on the same layer (other seeds:
# the same seed draws the same adapter) and on different layers.
ACTIVE_PAIRS = [
    (
        "RLoRA same target",
        "rlora",
        RLoraConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False, "init_seed": 1},
    ),
    (
        "RLoRA other targets",
        "rlora",
        RLoraConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
]

# Tests run and required to raise MERGE_REFUSAL, with what they check before merging.
MERGE_REFUSED = {
    "test_merge_layers": "merge_adapter / merge_and_unload are refused",
    "test_merge_layers_fp16": "merging an fp16 model is refused",
    "test_merge_layers_nan": "safe merging is refused before any NaN check",
    "test_merge_layers_multi": "merging several adapters is refused",
    "test_merge_layers_is_idempotent": "merging is refused",
    "test_merge_layers_is_deterministic_in_train_mode": "merging is refused",
    "test_safe_merge": "safe_merge is refused",
    "test_disable_adapters_with_merging": "merge_adapter is refused after training",
    "test_forward_float16": "fp16 forward passes, then merge_adapter is refused",
    "test_forward_bfloat16": "bf16 forward passes, then merge_adapter is refused",
    "test_forward_float16_no_autocast": "fp16 forward (fp16 adapter) passes, then merge_adapter is refused",
    "test_forward_bfloat16_no_autocast": "bf16 forward (bf16 adapter) passes, then merge_adapter is refused",
    "test_delete_merged_adapter_raises_without_mutation": "the merge it starts from is refused",
    "test_delete_merged_adapter_only_rejects_the_merged_one": "the merge it starts from is refused",
    "test_multiple_active_adapters_merge_and_unmerge": "merging two active adapters is refused",
    "test_sequential_merge_matches_batch_merge": "merging one adapter after the other is refused",
    "test_unmerge_after_sequential_merge_restores_base": "merging one adapter after the other is refused",
}

# Tests over RLORA's parameters that are not run, and why: `name` (or `Tester.name`) for every case,
# `name[case id]` for one.
LEFT_OUT = {
    "TestDecoderModels.test_merge_layers_multi": "it first requires a second adapter of the same config, added "
    "after torch.manual_seed(1), to differ from the first; RLORA draws every adapter from `init_seed` and the layer "
    "name (the same on every rank), not from torch's global generator (and the merge it ends in is refused)",
    "test_disable_adapters[MLP 6 RLoRA top-k rsLoRA]": "it first checks that the output equals the base's at init, "
    "which docs/method.md#the-router documents as not exact with router_top_k and init='random' (the offset "
    "subtracts the dense mean)",
    "test_active_adapter[MLP 3 RLoRA modules_to_save]": "PEFT refuses several active adapters with modules_to_save "
    "(the test skips it)",
    "test_disable_adapter_with_bias_warns": "skips itself for every method but LoRA and BOFT (a `bias` option)",
    "test_adding_multiple_adapters_with_bias_raises": "about LoRA's `bias` option, which RLORA does not have",
    "test_mixed_adapter_batches": "RLORA has no mixed adapter batches (the `adapter_names` forward argument)",
    "test_generate_with_mixed_adapter_batches": "RLORA has no mixed adapter batches",
    "test_weighted_combination_of_adapters": "add_weighted_adapter is LoRA/IA3 only (the test skips others)",
    "test_lora_conversion": "convert_to_lora needs a mergeable delta weight, which RLORA has not",
    "test_training_prompt_learning_tasks": "prompt-learning methods only (skips others)",
    "test_prompt_tuning_text_prepare_for_training": "prompt tuning only",
    "test_prompt_tuning_sample_vocab_prepare_for_training": "prompt tuning only",
    "test_prompt_learning_with_gradient_checkpointing": "prompt learning only",
    "test_set_requires_grad_prompt_learning_raises": "prompt learning only",
    "test_training_decoders_layer_indexing": "checks layers_to_transform via a LoRA-only count of `lora_` keys",
}


def _rerun(test, replacements: dict[str, tuple[list, list[str]]]):
    """`test` of an upstream tester with its parametrizations in `replacements` (argnames -> values, ids)
    swapped for RLORA's; a test in MERGE_REFUSED must end in the merge refusal. A test that skips itself
    fails."""
    name = test.__name__
    refused = name in MERGE_REFUSED

    @functools.wraps(test)
    def run(self, *args, **kwargs):
        try:
            if not refused:
                return test(self, *args, **kwargs)
            with pytest.raises(ConfigError, match=f"^{re.escape(MERGE_REFUSAL)}$"):
                test(self, *args, **kwargs)
        except pytest.skip.Exception as skip:  # a skip is not a pass: leave the case out in LEFT_OUT instead
            pytest.fail(f"PEFT's {name} skipped itself for RLORA ({skip.msg}); list it in LEFT_OUT with the reason")

    marks = []
    for mark in getattr(test, "pytestmark", []):
        names = mark.args[0] if mark.name == "parametrize" else None
        if isinstance(names, str) and names in replacements:
            kept = [(v, i) for v, i in zip(*replacements[names], strict=True) if f"{name}[{i}]" not in LEFT_OUT]
            mark = pytest.mark.parametrize(names, [v for v, _ in kept], ids=[i for _, i in kept]).mark
        marks.append(mark)
    run.pytestmark = marks
    return run


def rlora_tester(base: type, replacements: dict[str, tuple[list, list[str]]]) -> type:
    """A subclass of the upstream tester `base` whose tests run RLORA's cases: each test parametrized over
    one of `replacements`' argnames is re-parametrized; the others are not collected."""
    namespace = {"__doc__": f"PEFT's `{base.__name__}`, re-parametrized with RLORA cases."}
    for name in dir(base):
        test = getattr(base, name)
        if not name.startswith("test_") or not callable(test):
            continue
        argnames = {str(m.args[0]) for m in getattr(test, "pytestmark", []) if m.name == "parametrize"}
        if name in LEFT_OUT or f"{base.__name__}.{name}" in LEFT_OUT or not argnames & replacements.keys():
            namespace[name] = None  # not collected
        else:
            namespace[name] = _rerun(test, replacements)
    return type(f"TestRLora{base.__name__.removeprefix('Test')}", (base,), namespace)


if FETCH_ERROR is None:
    TestRLoraPeftCustomModel = rlora_tester(
        custom.TestPeftCustomModel,
        {
            "test_name, model_id, config_cls, config_kwargs": (MLP_CASES, [c[0] for c in MLP_CASES]),
            "config_cls": ([RLoraConfig], ["RLoraConfig"]),
            "config0": ([RLoraConfig(target_modules=["lin0"], init_weights=False)], ["init_weights=False"]),
        },
    )
    TestRLoraDecoderModels = rlora_tester(
        decoder.TestDecoderModels,
        {
            "model_id": ([str(peft_upstream.tiny_causal_lm())], ["tiny-llama"]),
            "config_cls,config_kwargs": (DECODER_CONFIGS, ["rlora-3-heads", "rlora-1-head-zero-all-linear"]),
        },
    )
    TestRLoraMultipleActiveAdapters = rlora_tester(
        custom.TestMultipleActiveAdapters,
        {"test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2": (ACTIVE_PAIRS, ["same", "other"])},
    )
