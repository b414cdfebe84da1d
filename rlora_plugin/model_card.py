"""The model cards (README.md) of a saved R-LoRA adapter and of its frozen-gate export.

PEFT's and Axolotl's cards say nothing about R-LoRA, so a person who downloads the adapter from a model hub
gets PEFT's bare `KeyError: 'RLORA'`. The R-LoRA section says what the adapter is, how to install and load
it, which base model to load it on, and its settings; it is written between markers, so writing it again
replaces it, and the card's tags get `rlora` and `peft`. The base is read from the `adapter_config.json`
beside the card (`base_model_name_or_path`, what `AutoPeftModelForCausalLM` loads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

START, END = "<!-- rlora-plugin: start -->", "<!-- rlora-plugin: end -->"
TAGS = ("rlora", "peft")
# What PEFT (0.18-0.21) raises on an R-LoRA adapter without `import rlora_plugin`: its method registry is a dict
# indexed by the saved `peft_type`, and nothing in an adapter's files can make PEFT word it otherwise.
UNREGISTERED_ERROR = "KeyError: 'RLORA'"
# As README.md's Install section says: no `pip install rlora-plugin` until the package is published.
NOT_ON_THE_INDEX = "rlora-plugin is not on the package index yet: install it from a clone of its repository"
# transformers' card for a run whose base it takes for no hub model (Axolotl trains from a local directory).
FROM_SCRATCH = "This model was trained from scratch on "


def is_hub_id(name: str | None) -> bool:
    """Whether `name` can be a model-hub repo id (`org/model`), and is not a local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).is_absolute() or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_model_text(base: str | None) -> str:
    """Which base model to load the adapter on; for a local copy, how to record the base's hub id instead."""
    if is_hub_id(base):
        return (
            f"Base model: [`{base}`](https://huggingface.co/{base}), recorded as `base_model_name_or_path` in "
            "`adapter_config.json`: `AutoPeftModelForCausalLM` loads it from there."
        )
    where = f"a local copy, `{base}`" if base else "a base model it does not record"
    return (
        f"Base model: this adapter was trained on {where}, which is not a model-hub id, so "
        "`AutoPeftModelForCausalLM` cannot find it elsewhere: load the base by its hub id and the adapter on it, "
        "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HUB_ID), ADAPTER)`. To record the "
        "hub id instead, train with it as the base (Axolotl's `base_model`, LLaMA-Factory's `model_name_or_path`; "
        "with the model in the Hugging Face cache, `HF_HUB_OFFLINE=1` trains offline), or before publishing set "
        "`base_model_name_or_path` in `adapter_config.json` to it."
    )


def card_section(settings: dict[str, Any], base: str | None = None, beside_model_config: bool = False) -> str:
    """The R-LoRA section; `beside_model_config`: the directory also holds a model `config.json` (Axolotl's)."""
    shown = {key: sorted(value) if isinstance(value, (set, frozenset)) else value for key, value in settings.items()}
    rows = "\n".join(f"| `{key}` | `{value!r}` |" for key, value in shown.items())  # a set sorted: stable text
    not_auto_model = (
        "\n\nNot `AutoModelForCausalLM.from_pretrained(ADAPTER)`: next to the model `config.json` in this "
        "directory, transformers takes it for a full model and looks for its weights."
        if beside_model_config
        else ""
    )
    return f"""{START}
## R-LoRA adapter

This is an [R-LoRA](https://arxiv.org/abs/2502.15455) adapter (`peft_type: RLORA`): a shared LoRA
down-projection `A`, several up-projection heads `B_i`, and a router that mixes the heads per token. PEFT
knows this adapter type only after `import rlora_plugin`; without it, loading fails with
`{UNREGISTERED_ERROR}`.

```bash
# {NOT_ON_THE_INDEX}
git clone RLORA_PLUGIN_REPOSITORY rlora-plugin && pip install -e ./rlora-plugin   # or a wheel built from it
```

```python
import rlora_plugin  # registers the RLORA PEFT type: import it before loading
from peft import AutoPeftModelForCausalLM  # or PeftModel.from_pretrained(base_model, ADAPTER)

model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER)  # this repository or directory
```{not_auto_model}

{base_model_text(base)}

It cannot be merged into the base weights (the router mixes its heads per token). To merge or to serve it
with an engine that serves plain LoRA, export it with frozen gates:
`python -m rlora_plugin.export ADAPTER OUT_DIR --gates uniform`.

| R-LoRA setting | value |
|---|---|
{rows}
{END}"""


def export_section(source: str, gates: str, targets: list[str], base: str | None = None) -> str:
    """The section of a frozen-gate export (a plain LoRA): where it comes from, how to load it, its targets."""
    shown = ", ".join(f"`{t}`" for t in targets[:3]) + (", ..." if len(targets) > 3 else "")
    return f"""{START}
## Plain LoRA exported from an R-LoRA adapter

A standard PEFT LoRA (`peft_type: LORA`, scaling 1) written by `python -m rlora_plugin.export` from the
R-LoRA adapter `{source}` with its router's gates frozen to {gates}. Each layer's update is the R-LoRA
update with those constant gates, so it equals the R-LoRA model run with its gates fixed to them (not the
routed model, where the trained router was not constant). It loads without rlora-plugin, merges with
`merge_and_unload()` or `axolotl merge-lora`, and can be served by any engine that serves LoRA.

```python
from peft import AutoPeftModelForCausalLM  # or PeftModel.from_pretrained(base_model, ADAPTER)

model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER)  # this repository or directory
```

{base_model_text(base)}

Target modules ({len(targets)}, listed in `adapter_config.json`): {shown}
{END}"""


def recorded_base(directory: str | Path) -> str | None:
    """The `base_model_name_or_path` of the adapter_config.json in `directory` (None without one)."""
    config_file = Path(directory) / "adapter_config.json"
    return json.loads(config_file.read_text()).get("base_model_name_or_path") if config_file.is_file() else None


def write_card(directory: str | Path, settings: dict[str, Any]) -> Path:
    """Add (or replace) the R-LoRA section at the top of `directory`/README.md and tag the card."""
    base = recorded_base(directory)
    section = card_section(settings, base, beside_model_config=(Path(directory) / "config.json").is_file())
    return write_section(directory, section, base, TAGS)


def write_export_card(directory: str | Path, source: str, gates: str, targets: list[str]) -> Path:
    """The card of a frozen-gate export in `directory` (beside its adapter_config.json)."""
    base = recorded_base(directory)
    return write_section(directory, export_section(source, gates, targets, base), base, ("lora", "peft", "rlora"))


def write_section(directory: str | Path, section: str, base: str | None, tags: tuple[str, ...]) -> Path:
    """Put `section` at the top of `directory`/README.md (replacing an earlier one), add `tags`, and replace
    transformers' "trained from scratch" (its words for a base it takes for no hub model). The metadata's
    `base_model` is the recorded base when that is a hub id, else as PEFT writes it (the base's name or path, a
    convention PEFT's own tests hold); the section's text tells a hub user which base to load."""
    from huggingface_hub import ModelCard

    path = Path(directory) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\nlibrary_name: peft\n---\n")
    if is_hub_id(base):  # e.g. recorded after training from a local copy: the metadata links it too
        card.data.base_model = base
    card.data.tags = sorted(set(card.data.tags or []) | set(tags))
    text = card.text
    if START in text and END in text:
        text = text[: text.index(START)] + text[text.index(END) + len(END) :]
    if is_hub_id(base):
        base_ref = f"[{base}](https://huggingface.co/{base})"
    else:
        base_ref = f"the local base model `{base}`" if base else "its base model"
    text = text.replace(FROM_SCRATCH, f"This model is an adapter of {base_ref}, fine-tuned on ")
    card.text = f"{section}\n\n{text.strip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path
