"""LoCA's alternating schedule (``spectral_peft.loca.schedule``) on a tiny random BERT, by hand and in a Trainer.

Schedule used throughout: coefficient_steps=3, location_steps=2, location_learning_steps=12, so optimizer steps
0-2 coefficients, 3-4 locations, 5-7 coefficients, 8-9 locations, 10-11 coefficients, 12+ final.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import spectral_peft
from spectral_peft import LocaCallback, LocaSchedule, loca_param_groups
from spectral_peft.loca import LocaLinear
from spectral_peft.loca.schedule import phase_at
from spectral_peft.loca.locations import resolve_moves

from ..conftest import build_bert, make_input_ids

C, L, F = "coefficients", "locations", "final"
EXPECTED_PHASES = [C, C, C, L, L, C, C, C, L, L, C, C] + [F] * 8  # steps 0..19


def loca_config(**overrides) -> spectral_peft.LocaConfig:
    kwargs = dict(
        target_modules=["query", "value"], n_frequency=50, coefficient_steps=3, location_steps=2,
        location_learning_steps=12, modules_to_save=["classifier"], location_seed=0,
    )
    kwargs.update(overrides)
    return spectral_peft.LocaConfig(**kwargs)


def make_model(seed: int = 0, **overrides):
    model = get_peft_model(build_bert(seed), loca_config(**overrides))
    model.train()
    return model


def loca_layers(model) -> list[LocaLinear]:
    layers = [m for m in model.modules() if isinstance(m, LocaLinear)]
    assert len(layers) == 4  # query and value of 2 layers
    return layers


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "loca_" in name}


def cells_snapshot(model) -> list[torch.Tensor]:
    return [layer.loca_cells["default"].clone() for layer in loca_layers(model)]


def batch(seed: int, size: int = 4):
    ids = make_input_ids(batch=size, seq_len=8, seed=seed)
    labels = torch.randint(0, 3, (size,), generator=torch.Generator().manual_seed(seed + 1000))
    return ids, labels


def forward_backward(model, seed: int, accumulation: int = 1) -> None:
    for micro in range(accumulation):
        ids, labels = batch(seed * 31 + micro)
        loss = model(input_ids=ids, labels=labels).loss / accumulation
        loss.backward()


def assert_cells_consistent(model) -> None:
    """cells in range, distinct, and what the float locations round to."""
    for layer in loca_layers(model):
        cells = layer.loca_cells["default"]
        param = layer.loca_locations["default"].detach()
        m, n = layer.shape
        assert cells.dtype == torch.long and cells.shape == (2, 50)
        assert int(cells[0].min()) >= 0 and int(cells[0].max()) < m
        assert int(cells[1].min()) >= 0 and int(cells[1].max()) < n
        assert (cells[0] * n + cells[1]).unique().numel() == 50, "two coefficients share a cell"
        assert torch.isfinite(param).all()
        assert torch.equal(param.round().long(), cells), "float locations do not round to the cells in use"


def layer_phase_is(model, phase: str) -> bool:
    return all(layer.loca_phase["default"] == (phase != L, phase == L) for layer in loca_layers(model))


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# the phase sequence


def test_phase_at_sequence():
    assert [phase_at(s, 3, 2, 12) for s in range(20)] == EXPECTED_PHASES
    assert [phase_at(s, 0, 2, 5) for s in range(7)] == [L] * 5 + [F] * 2
    assert [phase_at(s, 2, 0, 5) for s in range(7)] == [C] * 5 + [F] * 2
    assert [phase_at(s, 1, 1, 0) for s in range(3)] == [F] * 3
    assert phase_at(10 ** 6, 3, 2, 12) == F


def test_schedule_phase_sequence_and_layer_phases():
    model = make_model()
    schedule = LocaSchedule(model)
    seen = []
    for step in range(20):
        assert schedule.step_count == step
        phase = schedule.phase()
        assert schedule.phase("default") == phase
        seen.append(phase)
        assert layer_phase_is(model, phase), (step, phase)
        schedule.step()
    assert seen == EXPECTED_PHASES


def test_gradient_accumulation_and_evaluation_do_not_advance_the_schedule():
    model = make_model()
    schedule = LocaSchedule(model)
    optimizer = torch.optim.AdamW(loca_param_groups(model, lr=1e-2, location_lr=0.5))
    seen = []
    for step in range(14):
        phase = schedule.phase()
        seen.append(phase)
        for micro in range(4):
            ids, labels = batch(step * 10 + micro)
            (model(input_ids=ids, labels=labels).loss / 4).backward()
            # forwards (and backwards) inside one optimizer step never change the phase
            assert schedule.step_count == step and schedule.phase() == phase
            assert layer_phase_is(model, phase)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        # evaluation forwards under no_grad, in eval mode, between optimizer steps
        model.eval()
        before = snapshot(model)
        cells_before = cells_snapshot(model)
        with torch.no_grad():
            for k in range(3):
                model(input_ids=batch(500 + k)[0])
        model.train()
        after = snapshot(model)
        assert schedule.step_count == step + 1
        assert layer_phase_is(model, schedule.phase())
        assert all(torch.equal(before[k], after[k]) for k in before), "an evaluation forward changed the adapter"
        assert all(torch.equal(a, b) for a, b in zip(cells_before, cells_snapshot(model)))
        assert_cells_consistent(model)
    assert seen == EXPECTED_PHASES[:14]


# ----------------------------------------------------------------------------------------------------------------
# what moves in which phase


def _run_and_check_freezing(model, optimizer, schedule, steps: int) -> int:
    """Train ``steps`` optimizer steps; check after each that only the phase's part moved. Returns the number of
    location steps after which some cell had changed."""
    layers = loca_layers(model)
    moved_steps = 0
    for step in range(steps):
        phase = schedule.phase()
        coefficients_before = [layer.loca_coefficients["default"].detach().clone() for layer in layers]
        locations_before = [layer.loca_locations["default"].detach().clone() for layer in layers]
        cells_before = cells_snapshot(model)

        forward_backward(model, step)
        for layer in layers:
            # DDP: every trainable adapter parameter gets a gradient (zero when frozen), never None
            assert layer.loca_coefficients["default"].grad is not None
            assert layer.loca_locations["default"].grad is not None
            if phase == L:
                assert torch.count_nonzero(layer.loca_coefficients["default"].grad) == 0
            else:
                assert torch.count_nonzero(layer.loca_locations["default"].grad) == 0
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()

        coefficients_after = [layer.loca_coefficients["default"].detach() for layer in layers]
        locations_after = [layer.loca_locations["default"].detach() for layer in layers]
        if phase == L:
            for b, a in zip(coefficients_before, coefficients_after):
                assert torch.equal(a, b), f"step {step} ({phase}): coefficients changed"
            if any(not torch.equal(b, a) for b, a in zip(cells_before, cells_snapshot(model))):
                moved_steps += 1
        else:
            for b, a in zip(locations_before, locations_after):
                assert torch.equal(a, b), f"step {step} ({phase}): locations changed"
            for b, a in zip(cells_before, cells_snapshot(model)):
                assert torch.equal(a, b), f"step {step} ({phase}): cells changed"
            assert any(not torch.equal(b, a) for b, a in zip(coefficients_before, coefficients_after)), (
                f"step {step} ({phase}): coefficients did not train"
            )
        assert_cells_consistent(model)
    return moved_steps


def test_frozen_parts_do_not_move_with_adamw_momentum_and_weight_decay():
    model = make_model()
    schedule = LocaSchedule(model)
    optimizer = torch.optim.AdamW(loca_param_groups(model, lr=1e-2, location_lr=2.0, weight_decay=0.1))
    moved = _run_and_check_freezing(model, optimizer, schedule, 16)
    assert moved >= 1, "no location moved in any location phase"


def test_frozen_parts_do_not_move_when_locations_share_the_decayed_group():
    # a user optimizer with everything in one AdamW group with weight decay (which would pull locations to 0)
    model = make_model()
    schedule = LocaSchedule(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    _run_and_check_freezing(model, optimizer, schedule, 14)


def test_locations_move_with_large_location_lr():
    model = make_model()
    initial_cells = cells_snapshot(model)
    schedule = LocaSchedule(model)
    optimizer = torch.optim.Adam(loca_param_groups(model, lr=1e-2, location_lr=0.5))
    _run_and_check_freezing(model, optimizer, schedule, 12)
    changed = sum(int((a != b).any(dim=0).sum()) for a, b in zip(initial_cells, cells_snapshot(model)))
    assert changed >= 1, "no location moved over two location phases with location_lr=0.5"


@pytest.mark.parametrize("location_steps", [1, 2])
def test_every_location_step_is_committed(location_steps):
    """The update of each location step takes effect: the cells after it are the accepted rounded locations.

    In particular the last location step of a phase must not be undone when the coefficient phase begins.
    """
    model = make_model(coefficient_steps=2, location_steps=location_steps, location_learning_steps=12)
    schedule = LocaSchedule(model)
    optimizer = torch.optim.Adam(loca_param_groups(model, lr=1e-2, location_lr=3.0))
    layers = loca_layers(model)
    location_steps_seen = 0
    for step in range(12):
        phase = schedule.phase()
        cells_before = cells_snapshot(model)
        forward_backward(model, step)
        optimizer.step()
        optimizer.zero_grad()
        if phase == L:
            location_steps_seen += 1
            expected = []
            for layer, old in zip(layers, cells_before):
                proposed = layer.loca_locations["default"].detach().round().long()
                proposed[0].clamp_(0, layer.out_features - 1)
                proposed[1].clamp_(0, layer.in_features - 1)
                assert not torch.equal(proposed, old), f"step {step}: the optimizer did not propose any move"
                expected.append(resolve_moves(old, proposed, layer.shape))
        schedule.step()
        # the next forward is what a training loop runs next; it must compute with the moved cells
        with torch.no_grad():
            model(input_ids=batch(900 + step)[0])
        if phase == L:
            for k, (layer, exp) in enumerate(zip(layers, expected)):
                assert torch.equal(layer.loca_cells["default"], exp), (
                    f"step {step} (location step, next phase {schedule.phase()}): layer {k} cells are not the "
                    f"accepted moves ({int((layer.loca_cells['default'] != exp).any(dim=0).sum())} differ)"
                )
        assert_cells_consistent(model)
    assert location_steps_seen == sum(phase_at(s, 2, location_steps, 12) == L for s in range(12)) > 0


def test_requires_grad_never_changes():
    model = make_model()
    expected = {name: p.requires_grad for name, p in model.named_parameters()}
    trainable = {name for name, flag in expected.items() if flag}
    assert any("loca_coefficients" in n for n in trainable)
    assert any("loca_locations" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    schedule = LocaSchedule(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == expected
    optimizer = torch.optim.Adam(loca_param_groups(model, lr=1e-2, location_lr=0.5))
    for step in range(15):
        forward_backward(model, step)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        assert {name: p.requires_grad for name, p in model.named_parameters()} == expected, f"after step {step}"


# ----------------------------------------------------------------------------------------------------------------
# state


def test_state_dict_round_trip_continues_the_sequence():
    model = make_model()
    first = LocaSchedule(model)
    for _ in range(4):
        first.step()
    state = first.state_dict()
    assert state == {"step": 4}

    second = LocaSchedule(model)
    assert second.step_count == 0 and second.phase() == C
    second.load_state_dict(state)
    assert second.step_count == 4
    seen = []
    for _ in range(12):
        seen.append(second.phase())
        assert layer_phase_is(model, seen[-1])
        second.step()
    assert seen == EXPECTED_PHASES[4:16]
    assert second.state_dict() == {"step": 16}


def test_state_dict_is_a_snapshot():
    model = make_model()
    schedule = LocaSchedule(model)
    state = schedule.state_dict()
    schedule.step()
    assert state == {"step": 0}
    assert schedule.state_dict() == {"step": 1}


@pytest.mark.parametrize("bad", [{}, {"step": -1}, {"step": 1.5}, {"step": "3"}, {"step": None}, {"steps": 3}])
def test_load_bad_state_raises(bad):
    model = make_model()
    schedule = LocaSchedule(model)
    schedule.step()
    with pytest.raises(ValueError):
        schedule.load_state_dict(bad)


# ----------------------------------------------------------------------------------------------------------------
# construction


def test_schedule_on_model_without_loca_raises():
    with pytest.raises((TypeError, ValueError)):
        LocaSchedule(build_bert(0))
    lora = get_peft_model(build_bert(0), LoraConfig(target_modules=["query", "value"], r=2))
    with pytest.raises(ValueError):
        LocaSchedule(lora)


def test_location_learning_steps_none_needs_total_steps():
    model = make_model(location_learning_steps=None)
    with pytest.raises(ValueError, match="total_steps"):
        LocaSchedule(model)


def test_location_learning_steps_none_is_ten_percent_of_total():
    model = make_model(location_learning_steps=None)
    schedule = LocaSchedule(model, total_steps=100)
    seen = []
    for _ in range(14):
        seen.append(schedule.phase())
        schedule.step()
    assert seen == [C, C, C, L, L, C, C, C, L, L, F, F, F, F]


def test_explicit_location_learning_steps_wins_over_total_steps():
    model = make_model(location_learning_steps=12)
    schedule = LocaSchedule(model, total_steps=100)
    schedule.load_state_dict({"step": 11})
    assert schedule.phase() == C
    schedule.step()
    assert schedule.phase() == F


def test_schedule_through_wrapper_module():
    # DistributedDataParallel-style wrappers keep the model in .module
    model = make_model()

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    schedule = LocaSchedule(Wrapper(model))
    for _ in range(3):
        schedule.step()
    assert schedule.phase() == L
    assert layer_phase_is(model, L)


def test_loca_param_groups():
    model = make_model()
    groups = loca_param_groups(model, lr=3e-3, location_lr=0.25, weight_decay=0.01)
    assert len(groups) == 2
    locations = {id(p) for name, p in model.named_parameters() if "loca_locations" in name}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(locations) == 4
    group_ids = [{id(p) for p in g["params"]} for g in groups]
    location_groups = [g for g, ids in zip(groups, group_ids) if ids == locations]
    assert len(location_groups) == 1, "the locations are not exactly one group"
    assert location_groups[0]["lr"] == 0.25 and location_groups[0]["weight_decay"] == 0.0
    other = [g for g, ids in zip(groups, group_ids) if ids != locations][0]
    assert {id(p) for p in other["params"]} == trainable - locations
    assert other["lr"] == 3e-3 and other["weight_decay"] == 0.01
    # no parameter twice, no frozen parameter
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    optimizer = torch.optim.AdamW(groups)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [3e-3, 0.25]


# ----------------------------------------------------------------------------------------------------------------
# in a transformers Trainer


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 32):
        self.ids = make_input_ids(batch=size, seq_len=8, seed=11)
        self.labels = torch.randint(0, 3, (size,), generator=torch.Generator().manual_seed(12))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class PhaseRecorder(TrainerCallback):
    """Records, at the start of each optimizer step, the schedule's phase and what the layers were set to."""

    def __init__(self, loca_callback: LocaCallback, model):
        self.loca_callback = loca_callback
        self.model = model
        self.phases, self.layer_phases, self.step_counts, self.global_steps = [], [], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        schedule = self.loca_callback.schedule
        self.phases.append(schedule.phase())
        self.step_counts.append(schedule.step_count)
        self.global_steps.append(state.global_step)
        self.layer_phases.append([layer.loca_phase["default"] for layer in loca_layers(self.model)])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_loca_callback_in_trainer(tmp_path, accumulation):
    model = make_model()
    callback = LocaCallback()
    recorder = PhaseRecorder(callback, model)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", gradient_accumulation_steps=accumulation, learning_rate=1e-2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TinyDataset(), callbacks=[callback, recorder])
    trainer.train()

    assert callback.schedule is not None
    assert callback.schedule.step_count == 12
    assert trainer.state.global_step == 12
    # one record per optimizer step, whatever the accumulation
    assert recorder.global_steps == list(range(12))
    assert recorder.step_counts == list(range(12))
    assert recorder.phases == EXPECTED_PHASES[:12]
    for phase, layer_phases in zip(recorder.phases, recorder.layer_phases):
        assert all(lp == (phase != L, phase == L) for lp in layer_phases), phase
    assert callback.schedule.phase() == F
    assert layer_phase_is(model, F)
    assert_cells_consistent(model)
    assert all(layer.loca_coefficients["default"].abs().max() > 0 for layer in loca_layers(model)), "no training"
