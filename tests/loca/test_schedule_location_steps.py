"""LocaSchedule on a tiny BERT: which parts train in which phase, and that every location step takes effect."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import spectral_peft
from spectral_peft.loca import LocaLinear

from ..conftest import BERT, make_input_ids


def loca_layers(model) -> list[LocaLinear]:
    return [m for m in model.modules() if isinstance(m, LocaLinear)]


def make_model(**config):
    model = get_peft_model(BERT.build(0), BERT.config(location_seed=0, **config))
    generator = torch.Generator().manual_seed(0)
    for layer in loca_layers(model):
        c = layer.loca_coefficients["default"]
        c.data.copy_(torch.randn(c.shape, generator=generator) * 0.5)
    return model


def free_cell(layer: LocaLinear) -> tuple[int, int]:
    cells = layer.loca_cells["default"]
    used = set((cells[0] * layer.in_features + cells[1]).tolist())
    flat = next(i for i in range(layer.out_features * layer.in_features) if i not in used)
    return flat // layer.in_features, flat % layer.in_features


def test_phases_follow_config():
    model = make_model(coefficient_steps=2, location_steps=3, location_learning_steps=12)
    schedule = spectral_peft.LocaSchedule(model)
    phases = []
    for _ in range(14):
        phases.append(schedule.phase())
        schedule.step()
    assert phases == ["coefficients"] * 2 + ["locations"] * 3 + ["coefficients"] * 2 + ["locations"] * 3 \
        + ["coefficients"] * 2 + ["final"] * 2


def test_location_learning_steps_none_needs_total_steps():
    model = make_model(coefficient_steps=1, location_steps=1)
    with pytest.raises(ValueError, match="total_steps"):
        spectral_peft.LocaSchedule(model)
    schedule = spectral_peft.LocaSchedule(model, total_steps=40)  # 10%: 4 steps of location learning
    phases = []
    for _ in range(6):
        phases.append(schedule.phase())
        schedule.step()
    assert phases == ["coefficients", "locations", "coefficients", "locations", "final", "final"]


@pytest.mark.parametrize("location_steps", [1, 2, 3])
def test_last_location_step_of_a_block_takes_effect(location_steps):
    """A location moved by the optimizer in the last step of a location block must land on its new cell.

    The move is made by hand (as an optimizer would, on the float parameter) so the test is deterministic.
    """
    model = make_model(coefficient_steps=1, location_steps=location_steps, location_learning_steps=50)
    schedule = spectral_peft.LocaSchedule(model)
    schedule.step()  # past the coefficient step
    for _ in range(location_steps - 1):
        schedule.step()
    assert schedule.phase() == "locations"  # the last step of the block
    layer = loca_layers(model)[0]
    target = free_cell(layer)
    with torch.no_grad():
        layer.loca_locations["default"][:, 0] = torch.tensor(target, dtype=torch.float32) + 0.2
    schedule.step()  # that optimizer step is over; the next phase trains coefficients
    assert schedule.phase() == "coefficients"
    assert tuple(layer.loca_cells["default"][:, 0].tolist()) == target


def test_last_location_step_before_final_takes_effect():
    model = make_model(coefficient_steps=1, location_steps=2, location_learning_steps=3)
    schedule = spectral_peft.LocaSchedule(model)
    schedule.step()
    schedule.step()
    assert schedule.phase() == "locations"  # step 2, the last one with location learning
    layer = loca_layers(model)[1]
    target = free_cell(layer)
    with torch.no_grad():
        layer.loca_locations["default"][:, 3] = torch.tensor(target, dtype=torch.float32)
    schedule.step()
    assert schedule.phase() == "final"
    assert tuple(layer.loca_cells["default"][:, 3].tolist()) == target


def test_drift_outside_location_phase_is_undone():
    model = make_model(coefficient_steps=2, location_steps=2, location_learning_steps=50)
    schedule = spectral_peft.LocaSchedule(model)
    assert schedule.phase() == "coefficients"
    layer = loca_layers(model)[0]
    before = layer.loca_cells["default"].clone()
    target = free_cell(layer)
    with torch.no_grad():
        layer.loca_locations["default"][:, 0] = torch.tensor(target, dtype=torch.float32)
    schedule.step()
    assert torch.equal(layer.loca_cells["default"], before)
    assert torch.equal(layer.loca_locations["default"], before.float())


def test_move_onto_occupied_cell_is_refused():
    model = make_model(coefficient_steps=0, location_steps=5, location_learning_steps=50)
    schedule = spectral_peft.LocaSchedule(model)
    assert schedule.phase() == "locations"
    layer = loca_layers(model)[0]
    before = layer.loca_cells["default"].clone()
    with torch.no_grad():
        layer.loca_locations["default"][:, 0] = before[:, 1].float()
    schedule.step()
    cells = layer.loca_cells["default"]
    assert torch.equal(cells, before)
    assert torch.unique(cells[0] * 32 + cells[1]).numel() == cells.shape[1]


@pytest.mark.parametrize("past", [-0.6, 0.45])
def test_a_location_pushed_past_the_border_stays_inside_and_is_saved_loadable(tmp_path, past):
    """Pushed outwards by less than the rounding distance, a border location keeps its cell and its float is
    clamped, so the saved adapter loads (it used to be saved at e.g. -0.6 and refused at load)."""
    from peft import PeftModel

    model = make_model(coefficient_steps=0, location_steps=5, location_learning_steps=50)
    spectral_peft.LocaSchedule(model)
    layer = loca_layers(model)[0]
    cells = layer.loca_cells["default"]
    border = layer.out_features - 1
    index = 0
    with torch.no_grad():
        # move coefficient 0 onto a free cell of the first (past < 0) or last row, then push it past that border
        row = 0 if past < 0 else border
        col = next(c for c in range(layer.in_features) if not ((cells[0] == row) & (cells[1] == c)).any())
        layer.loca_locations["default"][:, index] = torch.tensor([row, col], dtype=torch.float32)
        layer.commit_locations("default")
        layer.loca_locations["default"][0, index] = row + past
    assert tuple(layer.commit_locations("default")[:, index].tolist()) == (row, col)
    assert layer.loca_locations["default"][0, index].item() == row
    inputs = make_input_ids()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BERT.build(0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=inputs).logits, expected)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_real_training_phases_freeze_the_other_part(optimizer_cls):
    model = make_model(coefficient_steps=1, location_steps=2, location_learning_steps=6)
    schedule = spectral_peft.LocaSchedule(model)
    optimizer = optimizer_cls(spectral_peft.loca_param_groups(model, lr=1e-2, location_lr=2.0, weight_decay=0.1))
    ids = make_input_ids(4, 8)
    labels = torch.tensor([0, 1, 2, 0])
    layers = loca_layers(model)
    start_cells = [l.loca_cells["default"].clone() for l in layers]
    model.train()
    for _ in range(8):
        phase = schedule.phase()
        coefficients = [l.loca_coefficients["default"].detach().clone() for l in layers]
        cells = [l.loca_cells["default"].clone() for l in layers]
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        for layer, c, cell in zip(layers, coefficients, cells):
            if phase == "locations":
                assert torch.equal(layer.loca_coefficients["default"], c)
            else:
                assert not torch.equal(layer.loca_coefficients["default"], c)
                assert torch.equal(layer.loca_cells["default"], cell)
    moved = sum(int((l.loca_cells["default"] != s).any(0).sum()) for l, s in zip(layers, start_cells))
    assert moved > 0


def test_one_step_location_blocks_move_locations():
    """coefficient_steps=1, location_steps=1: every other step trains locations; some must move."""
    model = make_model(coefficient_steps=1, location_steps=1, location_learning_steps=12)
    schedule = spectral_peft.LocaSchedule(model)
    optimizer = torch.optim.Adam(spectral_peft.loca_param_groups(model, lr=1e-3, location_lr=2.0))
    ids = make_input_ids(4, 8)
    labels = torch.tensor([0, 1, 2, 0])
    layers = loca_layers(model)
    start = [l.loca_cells["default"].clone() for l in layers]
    model.train()
    for _ in range(12):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
    moved = sum(int((l.loca_cells["default"] != s).any(0).sum()) for l, s in zip(layers, start))
    assert moved > 0
