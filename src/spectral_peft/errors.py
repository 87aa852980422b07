"""The one exception the command line turns into a one-line message and exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a missing file, a malformed dataset, an unknown model or method).

    ``spectral-peft`` prints ``spectral-peft: error: <message>`` on stderr and exits with code 2, no traceback.
    """


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN): one line on stderr and exit code 1."""
