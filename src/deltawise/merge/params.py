"""Parameter specs and per-tensor resolution of recipe settings (mergekit semantics).

A setting is a scalar, a depth gradient (list of numbers interpolated over layer position),
or a list of ``{filter, value}`` rules (first rule whose filter is a substring of the tensor
name wins; no filter or ``*`` matches all). Precedence: the model's own ``parameters``, then
the recipe's top-level ``parameters``, then the method's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from deltawise.merge.recipe import ConditionalValue, Setting

REQUIRED = object()


class ParamError(ValueError):
    """A parameter value is invalid; the message names the value and the allowed range."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, int, bool or str
    default: Any = REQUIRED
    scope: Literal["global", "model"] = "global"
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[tuple[str, ...]] = None
    help: str = ""

    def coerce(self, value: Any) -> Any:
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
        text = str(value)
        if self.choices and text not in self.choices:
            raise ParamError(f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}")
        return text

    def _check_range(self, x: float) -> None:
        bad_low = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        bad_high = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        if bad_low or bad_high:
            lo = "-inf" if self.low is None else f"{self.low}"
            hi = "inf" if self.high is None else f"{self.high}"
            interval = f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"
            raise ParamError(f"{self.name}={x} is outside {interval}")

    def describe(self) -> str:
        default = "required" if self.default is REQUIRED else f"default {self.default!r}"
        scope = "per model" if self.scope == "model" else "recipe-wide"
        return f"{self.name} ({self.kind.__name__}, {scope}, {default}): {self.help}"


def layer_position(layer: Optional[int], num_layers: Optional[int]) -> float:
    """Depth in [0, 1] for gradients of a tensor in layer ``layer`` (``TensorRoles.layer_index``);
    tensors outside the layer stack (None) are at 0."""
    if layer is None or not num_layers:
        return 0.0
    if num_layers <= 1:
        return 1.0  # mergekit's convention for a single layer
    return min(layer, num_layers - 1) / (num_layers - 1)


def evaluate(setting: Setting, spec: Param, tensor_name: str, t: float) -> Any:
    """Value of ``setting`` for one tensor, or None when no filter rule matches."""
    if isinstance(setting, ConditionalValue):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(s, ConditionalValue) for s in setting):
            for rule in setting:
                if rule.filter in (None, "*") or rule.filter in tensor_name:
                    return evaluate(rule.value, spec, tensor_name, t)
            return None
        values = [spec.coerce(v) if spec.kind is not float else _number(spec, v) for v in setting]
        if spec.kind in (int, float):
            pos = t * (len(values) - 1)
            i0 = int(pos)
            i1 = min(len(values) - 1, i0 + 1)
            frac = pos - i0
            return spec.coerce((1 - frac) * values[i0] + frac * values[i1])
        return values[int(t * (len(values) - 1))]
    return spec.coerce(setting)


def _number(spec: Param, value: Any) -> float:
    # gradient endpoints are validated after interpolation, so only their type is checked here
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParamError(f"{spec.name} gradient entries must be numbers, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ParamError(f"{spec.name} gradient entries must be numbers, got {value!r}") from None


def resolve(spec: Param, sources: list[dict[str, Setting]], tensor_name: str, t: float) -> Any:
    """First source (highest precedence first) that sets ``spec`` for this tensor, else the default."""
    for source in sources:
        if spec.name in source:
            value = evaluate(source[spec.name], spec, tensor_name, t)
            if value is not None:
                return value
    if spec.default is REQUIRED:
        raise ParamError(f"missing required parameter {spec.name!r}")
    return spec.default


def leaf_problems(spec: Param, setting: Setting) -> list[str]:
    """Check every value written in a setting without knowing any tensor: scalars and gradient
    endpoints must be valid (interpolating between valid endpoints stays valid)."""
    if isinstance(setting, ConditionalValue):
        return leaf_problems(spec, setting.value)
    if isinstance(setting, list):
        return [msg for item in setting for msg in leaf_problems(spec, item)]
    try:
        spec.coerce(setting)
    except ParamError as exc:
        return [str(exc)]
    return []
