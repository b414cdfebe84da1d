"""Make `RLORA` a PEFT method: a member of PEFT's closed `PeftType` enum plus `register_peft_method`.

Both steps are idempotent, so importing `rlora_plugin` twice, or in every rank, is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "RLORA"


def add_peft_type_member(name: str) -> PeftType:
    """Add `name` to `PeftType` (a `str` enum) in place, the way `Enum` builds its own members."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    return member


def register_rlora() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import RLoraConfig
    from .model import RLoraModel

    peft_type = add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=RLoraConfig, model_cls=RLoraModel)
