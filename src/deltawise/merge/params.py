"""Per-tensor resolution of recipe settings (mergekit semantics); the ``Param`` type lives in deltawise.params.

A setting is a scalar, a depth gradient (list of numbers interpolated over layer position),
or a list of ``{filter, value}`` rules (first rule whose filter is a substring of the tensor
name wins; no filter or ``*`` matches all). Precedence: the model's own ``parameters``, then
the recipe's top-level ``parameters``, then the method's default.
"""

from __future__ import annotations

from typing import Any, Optional

from deltawise.merge.recipe import ConditionalValue, Setting
from deltawise.params import REQUIRED, Param, ParamError

__all__ = ["REQUIRED", "Param", "ParamError", "evaluate", "layer_position", "leaf_problems", "resolve"]


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
