"""The schedule a LoCA run gets by default: at least one full location cycle, even in a short run, and a warning
where a configuration can never move a location."""

from __future__ import annotations

import warnings

import pytest
import torch

from spectral_peft import LocaSchedule, loca_param_groups
from spectral_peft.loca.schedule import DEFAULT_LOCATION_LR, default_schedule, location_step_count, phase_at

from .test_schedule import loca_layers, make_model

C, L, F = "coefficients", "locations", "final"


def phases(bounds: tuple, total: int) -> list[str]:
    return [phase_at(step, *bounds) for step in range(total)]


@pytest.mark.parametrize("total", [4, 5, 10, 30, 40, 59, 60, 100, 200, 299, 300, 1000, 5000])
def test_every_run_of_four_steps_or_more_gets_one_full_cycle_and_trains_coefficients_alone_after(total):
    bounds = default_schedule(10, 20, total)
    seen = phases(bounds, total)
    assert L in seen  # locations learn
    first = seen.index(L)
    assert first >= 1 and C in seen[:first]  # a coefficient step first: a zero coefficient has no location gradient
    assert F in seen and seen.count(F) >= total // 2  # at least half the run trains the coefficients alone
    assert bounds[2] >= min(bounds[0] + bounds[1], total // 2)  # one full cycle
    assert location_step_count(*bounds) == seen.count(L)


def test_the_default_cycle_and_ten_percent_where_they_fit():
    assert default_schedule(10, 20, 200) == (10, 20, 30)  # one cycle (10% would be 20)
    assert default_schedule(10, 20, 1000) == (10, 20, 100)  # 10%
    assert default_schedule(10, 20, 60) == (10, 20, 30)  # one cycle is exactly half
    # shorter than two cycles: the cycle shrinks to half the run in the same ratio
    assert default_schedule(10, 20, 40) == (7, 13, 20)
    assert default_schedule(10, 20, 30) == (5, 10, 15)
    assert default_schedule(10, 20, 4) == (1, 1, 2)
    assert default_schedule(10, 20, 3)[2] == 0  # too short for any location step


def test_schedule_uses_the_default_for_a_short_run():
    model = make_model(coefficient_steps=10, location_steps=20, location_learning_steps=None)
    schedule = LocaSchedule(model, total_steps=30)
    seen = []
    for _ in range(30):
        seen.append(schedule.phase())
        schedule.step()
    assert seen == [C] * 5 + [L] * 10 + [F] * 15
    assert schedule.location_steps() == 10


@pytest.mark.parametrize("overrides, total", [
    ({"location_learning_steps": 3}, None),  # the window ends inside the first coefficient block (3 steps)
    ({"location_steps": 0, "location_learning_steps": None}, 100),
    ({"location_learning_steps": None}, 3),  # too short a run
])
def test_a_schedule_that_can_never_move_a_location_warns(overrides, total):
    model = make_model(**overrides)
    with pytest.warns(UserWarning, match="every location stays at its random start"):
        schedule = LocaSchedule(model, total_steps=total)
    assert schedule.location_steps() == 0


def test_freezing_on_purpose_does_not_warn_and_locations_never_move():
    model = make_model(location_learning_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = LocaSchedule(model, total_steps=20)
        assert schedule.check_location_lr(5.0) is None
    before = [layer.loca_cells["default"].clone() for layer in loca_layers(model)]
    optimizer = torch.optim.AdamW(loca_param_groups(model, lr=0.05, location_lr=5.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randint(1, 100, (4, 8), generator=g)
        model(input_ids=ids, labels=ids[:, 0] % 3).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    assert all(torch.equal(b, layer.loca_cells["default"]) for b, layer in zip(before, loca_layers(model)))
    assert all(torch.equal(layer.loca_locations["default"], layer.loca_cells["default"].float())
               for layer in loca_layers(model))


def test_a_location_lr_too_small_to_reach_another_cell_warns():
    model = make_model()  # 3 + 2 cycle over 12 steps: 4 location steps
    schedule = LocaSchedule(model, total_steps=20)
    assert schedule.location_steps() == 4
    with pytest.warns(UserWarning, match="no location will move"):
        assert "0.4 cells" in schedule.check_location_lr(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert schedule.check_location_lr(DEFAULT_LOCATION_LR * 10) is None


def test_one_location_lr_default_for_the_api_and_the_command_line():
    import inspect

    try:  # the command line's front end (it imports no torch, so it keeps its own copy of the number)
        from spectral_peft_cli.arguments import DEFAULT_LOCATION_LR as cli_default
    except ImportError:
        from spectral_peft.tools.arguments import DEFAULT_LOCATION_LR as cli_default

    assert inspect.signature(loca_param_groups).parameters["location_lr"].default == DEFAULT_LOCATION_LR
    assert cli_default == DEFAULT_LOCATION_LR
