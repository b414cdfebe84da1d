"""Make `RLORA` a PEFT method: a member of PEFT's closed `PeftType` enum plus `register_peft_method`.

Both steps are idempotent, so importing `rlora_plugin` twice, or in every rank, is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

from .patching import Checked, private_attribute

PEFT_TYPE_NAME = "RLORA"
PEFT = Checked("peft", "0.18.1, 0.20.0 and 0.21.2")


def add_peft_type_member(name: str) -> PeftType:
    """Add `name` to `PeftType` (a `str` enum) in place, the way `Enum` builds its own members."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    names = private_attribute(PeftType, "_member_names_", list, PEFT)
    members = private_attribute(PeftType, "_member_map_", dict, PEFT)
    values = private_attribute(PeftType, "_value2member_map_", dict, PEFT)
    member._sort_order_ = len(names)
    type.__setattr__(PeftType, name, member)
    names.append(name)
    members[name] = member
    values[name] = member
    return member


def register_rlora() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import RLoraConfig
    from .model import RLoraModel

    peft_type = add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=RLoraConfig, model_cls=RLoraModel)
