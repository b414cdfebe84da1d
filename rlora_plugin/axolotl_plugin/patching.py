"""The one way this plugin changes a host framework's code: wrap a method once, loudly if it is missing.

Every patch is listed in docs/compatibility.md, with the versions it was checked against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

_WRAPPED = "_rlora_wrapped"


def wrap_once(owner: type, name: str, make_wrapper: Callable[[Callable], Callable], checked: str) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, unless this plugin has wrapped it already (every rank,
    and every registration of the plugin, may ask again). `checked` names the versions the patch was checked
    against, for the error on a version that does not have the method."""
    original = getattr(owner, name, None)
    if original is None:
        raise RuntimeError(
            f"rlora-plugin needs {owner.__module__}.{owner.__qualname__}.{name}, which this version does not have "
            f"(the patch was checked with {checked}). Install one of those versions, or report this at "
            "rlora-plugin with the versions you use."
        )
    if getattr(original, _WRAPPED, False):
        return
    wrapper: Any = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(owner, name, wrapper)
