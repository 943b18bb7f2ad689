"""The one family of errors that `fbnet` reports as their message alone, as opposed to bugs.

`fbnet` prints a `UserError` as `fbnet: error: <message>` (no traceback) and exits with the
error's `exit_code`: 2 (`EXIT_USAGE`) for a mistake in the command, the config or the data,
where nothing was changed; 1 (`EXIT_FAILED`) for a command that could not finish for a reason
the message states (a grain worker process that died, an export that does not reproduce the
model). Everything else keeps its traceback. Raise these only where the message says all the
user needs: what is wrong, where (the field, file or flag), and what would be accepted.

Every module may raise them, data_pipelines included: this one imports nothing.
"""

EXIT_FAILED, EXIT_USAGE = 1, 2


class UserError(Exception):
    """Something the user asked for cannot be done as asked (a flag, a path, a split, a step).

    Attributes:
      exit_code: `fbnet`'s exit status for it; a subclass sets its own.
    """

    exit_code = EXIT_USAGE


class ConfigError(UserError, ValueError):
    """A config is invalid, alone or against the run it would continue; one line per problem."""

    def __init__(self, problems: list[str] | str, header: str = "invalid config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = self.problems
        text = lines[0] if len(lines) == 1 else "\n".join(f"  - {p}" for p in lines)
        super().__init__(f"{header}: {text}" if len(lines) == 1 else f"{header}:\n{text}")
