"""The exceptions the command line turns into a message and an exit code, and the collector that lets a check report
every problem it finds at once."""

from __future__ import annotations

import sys

# a bad input can make one problem per row or image: the message shows this many, then a count of the rest
SHOWN_PROBLEMS = 20


class UsageError(Exception):
    """Bad input from the user (a missing file, a malformed dataset, an unknown model or method).

    ``spectral-peft`` prints ``spectral-peft: error: <message>`` on stderr and exits with code 2, no traceback. With
    several problems the first line counts them and each follows on its own line.
    """

    def __init__(self, *problems: str):
        self.problems = list(problems)
        if len(problems) == 1:
            message = problems[0]
        else:
            shown = [f"  - {p}" for p in problems[:SHOWN_PROBLEMS]]
            if len(problems) > SHOWN_PROBLEMS:
                shown.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
            message = "\n".join([f"{len(problems)} problems:", *shown])
        super().__init__(message)


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN): one line on stderr and exit code 1."""


class Problems:
    """Problems found by one pass over the input: ``add`` each, then ``check`` raises them together."""

    def __init__(self):
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    def catch(self, check, *args, **kwargs):
        """``check(*args, **kwargs)``, with a UsageError it raises kept as problems; returns what it returned."""
        try:
            return check(*args, **kwargs)
        except UsageError as error:
            self.found += error.problems
        return None

    def passes(self, check, *args, **kwargs) -> bool:
        """Whether ``check(*args, **kwargs)`` raised no UsageError (whose problems are kept)."""
        before = len(self.found)
        self.catch(check, *args, **kwargs)
        return len(self.found) == before

    def check(self) -> None:
        if self.found:
            raise UsageError(*self.found)

    def __bool__(self) -> bool:
        return bool(self.found)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): libraries' errors can run to
    many lines, and a command's error is one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def report_error(error: Exception) -> int:
    """Print a :class:`UsageError` or :class:`TrainingError` as ``spectral-peft: error: ...`` on stderr; returns its
    exit code (2 for bad input, 1 when training failed)."""
    print(f"spectral-peft: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, UsageError) else 1
