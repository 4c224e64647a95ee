"""Typed method parameters, shared by merge methods and adapter/training methods.

A method declares its parameters once, as a tuple of ``Param``: name, type, default, allowed range
or choices, and a help line. The same declaration validates a value given in a recipe, on the
command line (as text) or from Python, fills the default, and lists the method in ``deltawise
methods`` and docs/adapt.md. Torch-free, so listing methods stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

REQUIRED = object()


class ParamError(ValueError):
    """A parameter value is invalid; the message names the value and the allowed range."""


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``kind`` is float, int, bool, str, or list (a list of strings, given as a list or as comma-separated
    text). ``default`` is ``REQUIRED`` (no default), a value, or ``None``: "decided by the method from
    other values", in which case ``help`` says how (e.g. alpha defaults to the rank).
    """

    name: str
    kind: type
    default: Any = REQUIRED
    scope: Literal["global", "model"] = "global"  # merge recipes: one value for the recipe, or one per model
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""

    def coerce(self, value: Any) -> Any:
        """``value`` converted to ``kind`` and checked against the range or choices; raises ParamError."""
        if value is None and self.default is None:
            return None  # explicitly "let the method decide"
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ParamError(f"{self.name} must be true or false, got {value!r}")
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ParamError(f"{self.name} must be a number, got {value!r}")
            try:
                number = float(value)
            except ValueError:
                raise ParamError(f"{self.name} must be a number, got {value!r}") from None
            if not math.isfinite(number):
                raise ParamError(f"{self.name} must be finite, got {value!r}")
            if self.kind is int:
                if number != int(number):
                    raise ParamError(f"{self.name} must be an integer, got {value!r}")
                number = int(number)
            self._check_range(number)
            return number
        if self.kind is list:
            return self._coerce_list(value)
        text = str(value)
        if self.choices and text not in self.choices:
            raise ParamError(f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}")
        return text

    def _coerce_list(self, value: Any) -> list[str]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise ParamError(f"{self.name} must be a comma-separated list of names, got {value!r}")
        names = [item.strip() for item in items]
        if not names or not all(names):
            raise ParamError(f"{self.name} must be a comma-separated list of non-empty names, got {value!r}")
        if self.choices:
            unknown = [n for n in names if n not in self.choices]
            if unknown:
                raise ParamError(f"{self.name} entries must be among {', '.join(self.choices)}; got {', '.join(unknown)}")
        return names

    def _check_range(self, x: float) -> None:
        bad_low = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        bad_high = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        if bad_low or bad_high:
            lo = "-inf" if self.low is None else f"{self.low}"
            hi = "inf" if self.high is None else f"{self.high}"
            opening = "(" if self.low_open or self.low is None else "["
            closing = ")" if self.high_open or self.high is None else "]"
            raise ParamError(f"{self.name}={x} is outside {opening}{lo}, {hi}{closing}")

    def describe(self, with_scope: bool = True) -> str:
        """One line for ``deltawise methods``: name, type, scope (merge recipes only), default and help."""
        if self.default is REQUIRED:
            default = "required"
        else:
            default = "default: see help" if self.default is None else f"default {self.default!r}"
        scope = ("per model, " if self.scope == "model" else "recipe-wide, ") if with_scope else ""
        return f"{self.name} ({self.kind.__name__}, {scope}{default}): {self.help}"


def resolve_values(owner: str, params: tuple[Param, ...], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every parameter of ``owner`` (a method name, for messages): the given value, validated, or the default.

    An unknown name is refused with the known names listed; a missing required one is refused too.
    """
    given = dict(given or {})
    known = {p.name: p for p in params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        takes = ", ".join(sorted(known)) if known else "no parameters"
        raise ParamError(f"{owner} has no parameter {', '.join(map(repr, unknown))}; it takes: {takes}")
    values: dict[str, Any] = {}
    for p in params:
        if p.name in given:
            try:
                values[p.name] = p.coerce(given[p.name])
            except ParamError as exc:
                raise ParamError(f"{owner}: {exc}") from None
        elif p.default is REQUIRED:
            raise ParamError(f"{owner} needs the parameter {p.name!r}: {p.help}")
        else:
            values[p.name] = p.default
    return values
