"""Option groups (``deltawise.options``) expanded into typer parameters.

``@options("run", RunOptions, only=(...), override={...})`` replaces the command's parameter ``run``
by one typer option per field of the group (flag names, short flag, range and help from the field's
``Flag``) and calls the command with a ``RunOptions`` instance. typer reads ``inspect.signature``, so
the wrapper carries a built ``__signature__``. Decorators stack: each expands one group.

Every float parameter of a decorated command (the groups' fields and the command's own options) refuses
NaN and infinities at parsing: ``--scale nan`` would otherwise write a model that is NaN throughout.

Old spellings kept for one release are hidden fields of their own (``MethodChoice``'s former
per-parameter flags) or hidden typer options of the command that renamed them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from typing import Any, Callable, Iterable, Mapping, Optional

import typer
from rich.markup import escape
from typer.models import ParameterInfo

from deltawise.options import Flag, default_of, flag_of, option_fields


def reject_nonfinite(value: Any) -> Any:
    """typer callback of float parameters: NaN and infinities are refused (click's ranges let NaN through)."""
    for number in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(number, float) and not math.isfinite(number):
            raise typer.BadParameter(f"must be a finite number, got {number}")
    return value


def holds_float(annotation: Any) -> bool:
    """Whether a parameter annotation is float, or contains one (``Optional[float]``, ``list[float]``)."""
    return annotation is float or any(holds_float(arg) for arg in typing.get_args(annotation))


def _screen_floats(parameter: inspect.Parameter, annotation: Any) -> None:
    """Give a float typer parameter the finiteness callback (kept when it has a callback of its own)."""
    if holds_float(annotation) and isinstance(parameter.default, ParameterInfo) and parameter.default.callback is None:
        parameter.default.callback = reject_nonfinite


def _typer_param(name: str, flag: Flag, default: Any, hidden: bool, positional: bool, annotation: Any = None):
    callback = reject_nonfinite if holds_float(annotation) else None
    # help texts are plain text (argparse shows them too); rich, which draws --help, would take "[ray]" for markup
    help_text = escape(flag.help) if flag.help else flag.help
    if positional:
        return typer.Argument(... if flag.required else default, help=help_text, min=flag.min, max=flag.max,
                              metavar=flag.metavar, hidden=hidden, callback=callback)
    names = [flag.long_name(name)] + ([flag.short] if flag.short else [])
    return typer.Option(... if flag.required else default, *names, help=help_text, min=flag.min, max=flag.max,
                        hidden=hidden or flag.hidden, metavar=flag.metavar, show_default=not flag.required,
                        callback=callback)


def options(param: str, group: type, *, only: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
            override: Optional[Mapping[str, Mapping[str, Any]]] = None, positional: Iterable[str] = (),
            hidden: bool = False) -> Callable:
    """Expand the option group ``group`` into the command's parameter ``param``.

    ``only``/``exclude`` pick fields (the others keep their defaults); ``override`` maps a field to
    new ``Flag`` attributes and/or ``default`` for this command (e.g. bam's learning rate);
    ``positional`` fields become arguments; ``hidden`` hides the whole group (deprecated options)."""
    override = dict(override or {})
    positional = set(positional)
    chosen = [f for f in option_fields(group) if (only is None or f.name in only) and f.name not in set(exclude)]
    unknown = (set(override) | positional) - {f.name for f in chosen}
    if unknown:
        raise TypeError(f"{group.__name__} has no selected field {', '.join(sorted(unknown))}")
    group_hints = typing.get_type_hints(group)
    specs: list[tuple[str, Flag, Any]] = []
    for f in chosen:
        changes = dict(override.get(f.name, {}))
        default = changes.pop("default", default_of(f))
        specs.append((f.name, dataclasses.replace(flag_of(f), **changes), default))
    fixed = {f.name: default_of(f) for f in option_fields(group) if f not in chosen}

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        # types, not strings: the wrapper's string annotations would be evaluated in this module's globals
        hints = typing.get_type_hints(command)
        if param not in signature.parameters:
            raise TypeError(f"{command.__name__} has no parameter {param!r}")
        parameters: list[inspect.Parameter] = []
        annotations: dict[str, Any] = {}
        for p in signature.parameters.values():
            if p.name != param:
                annotations[p.name] = hints.get(p.name, p.annotation)
                _screen_floats(p, annotations[p.name])
                parameters.append(p.replace(annotation=annotations[p.name]))
                continue
            for name, flag, default in specs:
                annotation = group_hints[name]
                typer_param = _typer_param(name, flag, default, hidden, name in positional, annotation)
                parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                                                    default=typer_param))
                annotations[name] = annotation
        annotations["return"] = hints.get("return", None)

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = dict(fixed)
            values.update({name: kwargs.pop(name) for name, _, _ in specs})
            kwargs[param] = group(**values)
            return command(*args, **kwargs)

        del wrapper.__wrapped__  # typer must see the built signature, not the command's
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        return wrapper

    return decorate
