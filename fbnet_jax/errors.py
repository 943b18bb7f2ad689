"""The errors that are the user's to fix, as opposed to bugs.

`fbnet` prints a `UserError` as its message alone (no traceback) and exits with status 2;
everything else keeps its traceback. Raise these only where the message says all the user needs:
what is wrong, where (the field, file or flag), and what would be accepted.
"""


class UserError(Exception):
    """Something the user asked for cannot be done as asked (a flag, a path, a split, a step)."""


class ConfigError(UserError, ValueError):
    """A config is invalid, alone or against the run it would continue; one line per problem."""

    def __init__(self, problems: list[str] | str, header: str = "invalid config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = self.problems
        text = lines[0] if len(lines) == 1 else "\n".join(f"  - {p}" for p in lines)
        super().__init__(f"{header}: {text}" if len(lines) == 1 else f"{header}:\n{text}")
