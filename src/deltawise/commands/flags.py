"""Option groups (``deltawise.options``) expanded into typer parameters.

``@options("run", RunOptions, only=(...), override={...})`` replaces the command's parameter ``run``
by one typer option per field of the group (flag names, short flag, range and help from the field's
``Flag``) and calls the command with a ``RunOptions`` instance. typer reads ``inspect.signature``, so
the wrapper carries a built ``__signature__``. Decorators stack: each expands one group.

A field's ``aliases`` become hidden options of their own; a value given under an old spelling is
used (with a deprecation warning) unless the new spelling was given too, which is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Iterable, Mapping, Optional

import typer

from deltawise.errors import InputError
from deltawise.options import Flag, default_of, flag_of, option_fields

_ALIAS = "_alias_{field}_{index}"


def _resolved_hints(function: Callable) -> dict[str, Any]:
    """Annotations as types: typer evaluates the signature, and string annotations of a command
    module (``from __future__ import annotations``) would be evaluated in the wrong globals."""
    return typing.get_type_hints(function)


def _typer_param(name: str, flag: Flag, default: Any, hidden: bool, positional: bool):
    if positional:
        return typer.Argument(... if flag.required else default, help=flag.help, min=flag.min, max=flag.max,
                              metavar=flag.metavar, hidden=hidden)
    names = [flag.long_name(name)] + ([flag.short] if flag.short else [])
    return typer.Option(... if flag.required else default, *names, help=flag.help, min=flag.min, max=flag.max,
                        hidden=hidden or flag.hidden, metavar=flag.metavar, show_default=not flag.required)


def options(param: str, group: type, *, only: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
            override: Optional[Mapping[str, Mapping[str, Any]]] = None, positional: Iterable[str] = (),
            hidden: bool = False, warn: Optional[Callable[[str], None]] = None) -> Callable:
    """Expand the option group ``group`` into the command's parameter ``param``.

    ``only``/``exclude`` pick fields (the others keep their defaults); ``override`` maps a field to
    new ``Flag`` attributes and/or ``default`` for this command (e.g. bam's learning rate);
    ``positional`` fields become arguments; ``hidden`` hides the whole group (deprecated options);
    ``warn`` receives the deprecation message when an old spelling is used."""
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
        hints = _resolved_hints(command)
        if param not in signature.parameters:
            raise TypeError(f"{command.__name__} has no parameter {param!r}")
        parameters: list[inspect.Parameter] = []
        annotations: dict[str, Any] = {}
        for p in signature.parameters.values():
            if p.name != param:
                annotations[p.name] = hints.get(p.name, p.annotation)
                parameters.append(p.replace(annotation=annotations[p.name]))
                continue
            for name, flag, default in specs:
                annotation = group_hints[name]
                parameters.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                                                    default=_typer_param(name, flag, default, hidden, name in positional)))
                annotations[name] = annotation
                for index, alias in enumerate(flag.aliases):
                    alias_name = _ALIAS.format(field=name, index=index)
                    alias_type = Optional[annotation] if annotation is not bool else Optional[bool]
                    parameters.append(inspect.Parameter(alias_name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=alias_type,
                                                        default=typer.Option(None, alias, hidden=True)))
                    annotations[alias_name] = alias_type
        annotations["return"] = hints.get("return", None)

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = dict(fixed)
            for name, flag, default in specs:
                value = kwargs.pop(name)
                for index, alias in enumerate(flag.aliases):
                    old = kwargs.pop(_ALIAS.format(field=name, index=index))
                    if old is None:
                        continue
                    if value != default:
                        raise InputError(f"{flag.long_name(name)} and its old spelling {alias} are both given")
                    if warn is not None:
                        warn(f"{alias} is deprecated; use {flag.long_name(name)}")
                    value = old
                values[name] = value
            kwargs[param] = group(**values)
            return command(*args, **kwargs)

        del wrapper.__wrapped__  # typer must see the built signature, not the command's
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        return wrapper

    return decorate
