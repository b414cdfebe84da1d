"""How this package reaches into a host framework, loudly when the host has changed.

Three tools: `wrap_once` replaces a method or a module's function (once, and only if it still takes the
parameters the wrapper reads by name), `private_attribute` checks a host's private attribute before it is
written, and `HostChanged` (`rlora_plugin.errors`) is the error both raise: it names the host, its installed
version, the versions the coupling was checked with, what is missing and what to do. A wrapper reads the
arguments of the call it wraps by name (`inspect.signature(original).bind(...)`), never by position. Every patch
and coupling is listed in docs/compatibility.md.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any

from .errors import DEFAULT_FIX, HostChanged

__all__ = ["DEFAULT_FIX", "Checked", "HostChanged", "private_attribute", "qualified_name", "wrap_once"]

_WRAPPED = "_rlora_wrapped"
_MISSING = object()


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


def qualified_name(owner: Any) -> str:
    """The dotted name of a module, a class, or an instance's class."""
    if isinstance(owner, ModuleType):
        return owner.__name__
    cls = owner if isinstance(owner, type) else type(owner)
    return f"{cls.__module__}.{cls.__qualname__}"


def wrap_once(
    owner: type | ModuleType,
    name: str,
    make_wrapper: Callable[[Callable], Callable],
    checked: Checked,
    parameters: tuple[str, ...] = (),
) -> None:
    """Replace `owner.name` (a method of a class, or a function or class in a module) by `make_wrapper(original)`,
    unless this plugin has wrapped it already (every rank, and every registration of the plugin, may ask again).
    `parameters`: the names the wrapper reads from the call's arguments; the original must still take each."""
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
    wrapper: Any = make_wrapper(original)
    if not isinstance(original, type):  # a class replaced by a factory keeps the factory's own name
        wrapper = functools.wraps(original)(wrapper)
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
