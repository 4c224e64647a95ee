"""Errors meant for the user: each carries a message that says what is wrong and what to do."""


class DeltawiseError(Exception):
    """Base class of every error deltawise reports to the user (the CLI prints it without a traceback)."""


class RecipeError(DeltawiseError):
    """The recipe cannot run: every problem found while planning (unknown method or parameter,
    bad value, wrong number of models, and inputs that are missing, corrupt, refused or
    mismatched), reported together in one message."""


class InputError(DeltawiseError):
    """An input cannot be used, found outside planning: by a reader directly, or while the merge
    streams (NaN/inf values, files changing under it)."""


class OutputError(DeltawiseError):
    """The output location cannot be written safely."""


def bullet_list(problems: list[str], limit: int = 20) -> str:
    """Format problems as an indented list, eliding the tail so one message stays readable."""
    shown = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"  - ... and {len(problems) - limit} more")
    return "\n".join(shown)
