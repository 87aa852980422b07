"""LoCA's schedule inside ``transformers.Trainer``."""

from __future__ import annotations

from transformers import TrainerCallback

from .schedule import LocaSchedule


class LocaCallback(TrainerCallback):
    """Runs :class:`LocaSchedule` from the Trainer's optimizer steps (``global_step``), resume included.

    ``trainer = Trainer(model, args, ..., callbacks=[LocaCallback()])``. Use ``loca_param_groups`` through
    ``optimizers=`` to give locations their own learning rate.
    """

    def __init__(self):
        self.schedule = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.schedule = LocaSchedule(model, total_steps=state.max_steps)
        # a resumed Trainer restores global_step before this, so the schedule continues in the same phase
        self.schedule.load_state_dict({"step": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        self.schedule.step()
