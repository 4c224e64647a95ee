"""``key=value`` command-line options (``--merge-param t=0.3``, ``--method-option ratio=0.5``,
``--search-param lambda=0.2,0.6,1``) parsed into typed values."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import yaml

from deltawise.errors import InputError


def scalar(text: str) -> Any:
    """A YAML scalar: 0.5 -> float, 3 -> int, true -> bool, anything else stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def parse_assignments(items: list[str] | None, option: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a malformed or repeated key is an error."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise InputError(f"{option} takes NAME=VALUE, got {item!r}")
        if key in result:
            raise InputError(f"{option} {key} is given twice")
        result[key] = value.strip()
    return result


def typed_fields(cls: type, values: dict[str, str], option: str) -> dict[str, Any]:
    """Values for fields of the dataclass ``cls`` by name; comma lists for list-typed fields."""
    known = {f.name: f for f in fields(cls) if f.name != "extra"}
    out: dict[str, Any] = {}
    for key, text in values.items():
        if key not in known:
            raise InputError(f"{option} {key}: unknown; known: {', '.join(sorted(known))}")
        out[key] = [t.strip() for t in text.split(",")] if "list" in str(known[key].type) else scalar(text)
    return out
