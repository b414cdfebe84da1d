"""How this package reaches into a host framework, loudly when the host has changed.

Three tools: `wrap_once` replaces a method (once, and only if it still takes the parameters the wrapper reads
by name), `private_attribute` checks a host's private attribute before it is written, and `HostChanged` is the
error both raise: it names the host, its installed version, the versions the coupling was checked with, what
is missing and what to do. A wrapper reads the arguments of the call it wraps by name
(`inspect.signature(original).bind(...)`), never by position. Every patch and coupling is listed in
docs/compatibility.md.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

_WRAPPED = "_rlora_wrapped"
_MISSING = object()
DEFAULT_FIX = (
    "Install one of the checked versions, or report this at rlora-plugin with the versions you use "
    "(docs/compatibility.md lists every coupling to a host)."
)


@dataclass(frozen=True)
class Checked:
    """A host package (its distribution name) and the versions a coupling to it was checked with."""

    package: str
    versions: str

    def installed(self) -> str:
        try:
            return version(self.package)
        except PackageNotFoundError:
            return "(not installed)"


class HostChanged(RuntimeError):
    """A host no longer has what a patch or coupling of rlora-plugin relies on."""

    def __init__(self, checked: Checked, needs: str, fix: str = DEFAULT_FIX) -> None:
        super().__init__(
            f"rlora-plugin needs {needs}, which {checked.package} {checked.installed()} does not provide (checked "
            f"with {checked.package} {checked.versions}). {fix}"
        )


def qualified_name(owner: Any) -> str:
    cls = owner if isinstance(owner, type) else type(owner)
    return f"{cls.__module__}.{cls.__qualname__}"


def wrap_once(
    owner: type,
    name: str,
    make_wrapper: Callable[[Callable], Callable],
    checked: Checked,
    parameters: tuple[str, ...] = (),
) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, unless this plugin has wrapped it already (every rank,
    and every registration of the plugin, may ask again). `parameters`: the names the wrapper reads from the
    call's arguments; the original must still take each of them."""
    original = getattr(owner, name, None)
    if original is None:
        raise HostChanged(checked, f"`{qualified_name(owner)}.{name}`")
    if getattr(original, _WRAPPED, False):
        return
    missing = [p for p in parameters if p not in inspect.signature(original).parameters]
    if missing:
        raise HostChanged(
            checked, f"`{qualified_name(owner)}.{name}` to take the parameter(s) {', '.join(map(repr, missing))}"
        )
    wrapper: Any = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(owner, name, wrapper)


def private_attribute(
    owner: Any, name: str, expected: type | tuple[type, ...], checked: Checked, fix: str = DEFAULT_FIX
):
    """`owner.name`, checked to exist and be an instance of `expected` before a coupling reads or writes it."""
    value = getattr(owner, name, _MISSING)
    if not isinstance(value, expected):
        kinds = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        found = "it is missing" if value is _MISSING else f"it is a {type(value).__name__}"
        raise HostChanged(checked, f"`{qualified_name(owner)}.{name}` as a {kinds} ({found})", fix)
    return value
