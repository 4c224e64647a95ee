"""The ``deltawise`` commands, one module per job; ``deltawise.cli`` registers them.

Shared pieces: ``console`` (output, progress bars, warnings) and ``flags`` (option groups from
``deltawise.options`` expanded into typer parameters). No command module imports another's
command, and none imports ``deltawise.cli``."""

