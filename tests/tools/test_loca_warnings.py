"""A finetune run's log says when LoCA's locations can never move (the schedule's warnings, in the run's words)."""

from __future__ import annotations

import pytest
from peft import get_peft_model

from spectral_peft import LocaConfig
from spectral_peft.tools.methods import METHODS
from spectral_peft.tools.training import _schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def loca(tiny_bert, **fields):
    config = LocaConfig(target_modules=["query", "value"], n_frequency=8, modules_to_save=["classifier"], **fields)
    return get_peft_model(tiny_bert, config)


@pytest.mark.parametrize("steps, location_lr, expected", [
    (3, 0.1, "every location stays at its random start"),  # too short a run for any location step
    (40, 0.01, "no location will move"),  # 13 location steps of 0.01 cells
])
def test_a_run_whose_locations_cannot_move_says_so(capsys, tiny_bert, steps, location_lr, expected):
    _schedule(METHODS["loca"], loca(tiny_bert), {"steps": steps, "location_lr": location_lr})
    err = capsys.readouterr().err
    assert "warning: " in err and expected in err


def test_a_short_default_run_learns_locations_and_says_nothing(capsys, tiny_bert):
    schedule = _schedule(METHODS["loca"], loca(tiny_bert), {"steps": 30, "location_lr": 0.1})
    assert schedule.location_steps() == 10 and "warning" not in capsys.readouterr().err


def test_the_frozen_ablation_says_nothing(capsys, tiny_bert):
    schedule = _schedule(METHODS["loca-frozen"], loca(tiny_bert, location_learning_steps=0),
                         {"steps": 30, "location_lr": 0.1})
    assert schedule.location_steps() == 0 and "warning" not in capsys.readouterr().err
