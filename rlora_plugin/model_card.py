"""The R-LoRA section of a saved adapter's model card (README.md).

PEFT's and Axolotl's cards say nothing about R-LoRA, so a person who downloads the adapter from a model hub
gets `KeyError: 'RLORA'` without `import rlora_plugin`. The section says what the adapter is, how to install
and load it, and its settings; it is written between markers, so writing it again replaces it, and the card's
tags get `rlora` and `peft`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

START, END = "<!-- rlora-plugin: start -->", "<!-- rlora-plugin: end -->"
TAGS = ("rlora", "peft")


def card_section(settings: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{key}` | `{value!r}` |" for key, value in settings.items())
    return f"""{START}
## R-LoRA adapter

This is an [R-LoRA](https://arxiv.org/abs/2502.15455) adapter (`peft_type: RLORA`): a shared LoRA
down-projection `A`, several up-projection heads `B_i`, and a router that mixes the heads per token. PEFT
knows this adapter type only after `import rlora_plugin`; without it, loading fails with
`Unknown PEFT type RLORA`.

```bash
pip install rlora-plugin   # until it is on the package index: pip install from a clone of rlora-plugin
```

```python
import rlora_plugin  # registers the RLORA PEFT type: import it before loading
from peft import AutoPeftModelForCausalLM  # or PeftModel.from_pretrained(base_model, ADAPTER)

model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER)  # this repository or directory
```

It cannot be merged into the base weights (the router mixes its heads per token). To merge or to serve it
with an engine that serves plain LoRA, export it with frozen gates:
`python -m rlora_plugin.export ADAPTER OUT_DIR --gates uniform`.

| R-LoRA setting | value |
|---|---|
{rows}
{END}"""


def write_card(directory: str | Path, settings: dict[str, Any]) -> Path:
    """Add (or replace) the R-LoRA section at the top of `directory`/README.md and tag the card."""
    from huggingface_hub import ModelCard

    path = Path(directory) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\n---\n")
    card.data.tags = sorted(set(card.data.tags or []) | set(TAGS))
    text = card.text
    if START in text and END in text:
        text = text[: text.index(START)] + text[text.index(END) + len(END) :]
    card.text = f"{card_section(settings)}\n\n{text.strip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path
