"""A finetune run's output folder and its checkpoint.

The folder holds ``run.json`` (written when the run starts), the saved model, ``training.png`` and ``metrics.json``
(written last: a folder without it is not a finished run). While the run trains, ``checkpoint/`` holds what a
resumed run needs; it is replaced atomically, through ``checkpoint.tmp/`` and ``checkpoint.old/``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Optional

from .errors import UsageError, first_line
from .files import write_json

RUN_FILE, METRICS_FILE, PLOT_FILE = "run.json", "metrics.json", "training.png"
CHECKPOINT = "checkpoint"
CHECKPOINT_STATE = "state.pt"


def trainable_state(model) -> dict:
    """What changes in training: every trainable parameter and every buffer (LoCA cells' source, S2FT orders)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def save_checkpoint(output: pathlib.Path, state: dict) -> None:
    """Atomically: written to checkpoint.tmp/, then swapped in for checkpoint/ (checkpoint.old/ in between)."""
    import torch

    tmp, final, old = output / (CHECKPOINT + ".tmp"), output / CHECKPOINT, output / (CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / CHECKPOINT_STATE)
    write_json(tmp / "checkpoint.json", {"step": state["step"], "total_steps": state["settings"]["steps"]})
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output: pathlib.Path) -> Optional[pathlib.Path]:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):  # .old: a crash between the two renames
        path = output / name / CHECKPOINT_STATE
        if path.is_file():
            return path
    return None


def load_checkpoint(path: pathlib.Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"cannot read the checkpoint {path}: {first_line(error)}") from None


def remove_checkpoints(output: pathlib.Path) -> None:
    for name in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp"):
        shutil.rmtree(output / name, ignore_errors=True)


def remove_outputs(output: pathlib.Path) -> None:
    """--overwrite: metrics.json first (so the folder never looks finished), then everything a run writes."""
    (output / METRICS_FILE).unlink(missing_ok=True)
    for child in output.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_output(output: pathlib.Path, resume: bool, overwrite: bool) -> Optional[pathlib.Path]:
    """Refuse to clobber: returns the checkpoint to resume from, if any. Creates nothing."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    if not output.exists() or overwrite:
        if overwrite and output.exists() and any(output.iterdir()) and not (output / RUN_FILE).exists():
            raise UsageError(f"--output {output} is not empty and was not written by spectral-peft; "
                             "--overwrite only replaces spectral-peft runs")
        return None
    if (output / METRICS_FILE).exists():
        if resume:
            return None  # the caller says it is finished
        raise UsageError(f"--output {output} holds a finished run (metrics.json); use another folder or --overwrite")
    checkpoint = find_checkpoint(output)
    if resume:
        if checkpoint is None and any(output.iterdir()) and not (output / RUN_FILE).exists():
            raise UsageError(f"--output {output} is not empty and was not written by spectral-peft")
        return checkpoint
    if any(output.iterdir()):
        if checkpoint is not None:
            raise UsageError(f"--output {output} holds an unfinished run with a checkpoint; pass --resume to continue "
                             "it or --overwrite to start again")
        raise UsageError(f"--output {output} is not empty; use another folder, or --overwrite if it is a "
                         "spectral-peft run")
    return None
