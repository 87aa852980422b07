"""The exceptions the command line turns into a one-line message and an exit code."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a missing file, a malformed dataset, an unknown model or method).

    ``spectral-peft`` prints ``spectral-peft: error: <message>`` on stderr and exits with code 2, no traceback.
    """


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN): one line on stderr and exit code 1."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): libraries' errors can run to
    many lines, and a command's error is one."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
