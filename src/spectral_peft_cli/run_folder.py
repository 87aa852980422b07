"""A finetune run's output folder, as far as the command line checks it before anything runs.

The folder holds ``run.json`` (written when the run starts), the saved model, ``training.png`` and ``metrics.json``
(written last: a folder without it is not a finished run). While the run trains, ``checkpoint/`` holds what a
resumed run needs (``spectral_peft.tools.checkpoints`` writes it).
"""

from __future__ import annotations

import pathlib
from typing import Optional

from .errors import UsageError

RUN_FILE, METRICS_FILE, PLOT_FILE = "run.json", "metrics.json", "training.png"
CHECKPOINT = "checkpoint"
CHECKPOINT_STATE = "state.pt"


def find_checkpoint(output: pathlib.Path) -> Optional[pathlib.Path]:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):  # .old: a crash between the two renames
        path = output / name / CHECKPOINT_STATE
        if path.is_file():
            return path
    return None


def _foreign(output: pathlib.Path) -> bool:
    """A folder that is not empty and holds no run.json: not written by spectral-peft."""
    return any(output.iterdir()) and not (output / RUN_FILE).exists()


def check_output(output: pathlib.Path, resume: bool, overwrite: bool) -> Optional[pathlib.Path]:
    """Refuse to clobber: returns the checkpoint to resume from, if any. Creates nothing."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    if not output.exists() or overwrite:
        if overwrite and output.exists() and _foreign(output):
            raise UsageError(f"--output {output} is not empty and was not written by spectral-peft; "
                             "--overwrite only replaces spectral-peft runs")
        return None
    if (output / METRICS_FILE).exists():
        if resume:
            return None  # the caller says it is finished
        raise UsageError(f"--output {output} holds a finished run (metrics.json); use another folder or --overwrite")
    checkpoint = find_checkpoint(output)
    if resume:
        if checkpoint is None and _foreign(output):
            raise UsageError(f"--output {output} is not empty and was not written by spectral-peft")
        return checkpoint
    if any(output.iterdir()):
        if checkpoint is not None:
            raise UsageError(f"--output {output} holds an unfinished run with a checkpoint; pass --resume to continue "
                             "it or --overwrite to start again")
        raise UsageError(f"--output {output} is not empty; use another folder, or --overwrite if it is a "
                         "spectral-peft run")
    return None


def check_finished_run(folder: pathlib.Path) -> None:
    """``evaluate --adapter``: a folder a finetune run finished in."""
    if not folder.is_dir():
        raise UsageError(f"adapter folder not found: {folder}")
    if not (folder / RUN_FILE).is_file():
        raise UsageError(f"{folder} has no run.json; it was not written by spectral-peft finetune")
    if not (folder / METRICS_FILE).is_file():
        raise UsageError(f"{folder} has no metrics.json: the run did not finish (resume it with finetune --resume)")
