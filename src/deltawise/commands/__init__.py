"""The ``deltawise`` commands, one module per job; ``deltawise.cli`` registers them (a command's run imports only
its own module, ``cli.register_commands``).

Shared pieces: ``console`` (output, progress bars, warnings) and ``flags`` (option groups from
``deltawise.options`` expanded into typer parameters). No command module imports another's
command, and none imports ``deltawise.cli``."""

