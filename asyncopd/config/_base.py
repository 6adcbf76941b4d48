"""ConfigError and the checks every config group uses.

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message names field, value and fix."""


def _fail(field_name: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"{field_name}={value!r}: {problem}. Fix: {fix}.")


def _check_fraction(field_name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        _fail(field_name, value, "is a fraction of a GPU's memory and must be in (0, 1]",
              f"set {field_name} to e.g. 0.3, or null for the automatic share")


def _check_positive(prefix: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            _fail(f"{prefix}.{name}", value, f"must be {bound}", f"set {prefix}.{name} to a value {bound}")
