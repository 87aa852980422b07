"""The exceptions the command line turns into a message and an exit code (defined in its light front end,
``spectral_peft_cli``, which reports them)."""

from __future__ import annotations

from spectral_peft_cli.errors import Problems, TrainingError, UsageError, first_line, report_error

__all__ = ["Problems", "TrainingError", "UsageError", "first_line", "report_error"]
