"""A finetune run's output folder and its checkpoint.

The folder holds ``run.json`` (written when the run starts), the saved model, ``training.png`` and ``metrics.json``
(written last: a folder without it is not a finished run). While the run trains, ``checkpoint/`` holds what a
resumed run needs; it is replaced atomically, through ``checkpoint.tmp/`` and ``checkpoint.old/``. The folder's
names and the checks of it before a run (``check_output``) are the command line's, in ``spectral_peft_cli``.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from spectral_peft_cli.run_folder import (  # noqa: F401  (the folder's names, for the tools)
    CHECKPOINT,
    CHECKPOINT_STATE,
    METRICS_FILE,
    PLOT_FILE,
    RUN_FILE,
    check_output,
    find_checkpoint,
)

from .errors import UsageError, first_line
from .files import write_json


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
