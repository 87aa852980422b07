"""Exact resume with the Python API: a LoCA run stopped in the middle of a location phase and resumed in a fresh
process-like setting (new base model, adapter from save_pretrained, optimizer, LocaSchedule.state_dict and RNG
restored) ends with the same adapter, bit for bit, as the run that was never stopped (the README's recipe)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import spectral_peft

from ..conftest import build_bert

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, STOP = 24, 5  # steps 0-2 coefficients, 3-7 locations: stopping after 5 steps stops inside a location phase
CONFIG = dict(target_modules=["query", "value"], n_frequency=16, modules_to_save=["classifier"], coefficient_steps=3,
              location_steps=5, location_learning_steps=16, location_seed=0)


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, 100, (4, 8), generator=g)
    return {"input_ids": ids, "labels": ids[:, 0] % 3}


def optimizer_for(model):
    return torch.optim.Adam(spectral_peft.loca_param_groups(model, lr=2e-2, location_lr=0.6))


def train(model, optimizer, schedule, steps: range) -> None:
    model.train()  # BERT's dropout stays on: the RNG state has to be restored too
    for step in steps:
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()


def test_a_run_resumed_mid_location_phase_ends_bit_identical(tmp_path):
    torch.manual_seed(7)
    whole = get_peft_model(build_bert(0), spectral_peft.LocaConfig(**CONFIG))
    start = {k: v.clone() for k, v in get_peft_model_state_dict(whole).items()}
    optimizer = optimizer_for(whole)
    train(whole, optimizer, spectral_peft.LocaSchedule(whole, total_steps=STEPS), range(STEPS))

    torch.manual_seed(7)
    first = get_peft_model(build_bert(0), spectral_peft.LocaConfig(**CONFIG))
    optimizer = optimizer_for(first)
    schedule = spectral_peft.LocaSchedule(first, total_steps=STEPS)
    train(first, optimizer, schedule, range(STOP))
    assert schedule.phase() == "locations"
    # the checkpoint a user writes: the adapter, the optimizer, the schedule and the RNG
    first.save_pretrained(tmp_path / "adapter")
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state()},
               tmp_path / "state.pt")
    del first, optimizer, schedule
    torch.manual_seed(12345)  # whatever happens in between

    state = torch.load(tmp_path / "state.pt")
    resumed = PeftModel.from_pretrained(build_bert(0), tmp_path / "adapter", is_trainable=True)
    optimizer = optimizer_for(resumed)
    optimizer.load_state_dict(state["optimizer"])
    schedule = spectral_peft.LocaSchedule(resumed, total_steps=STEPS)
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    train(resumed, optimizer, schedule, range(STOP, STEPS))

    expected, got = get_peft_model_state_dict(whole), get_peft_model_state_dict(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    moved = [k for k in expected if "loca_locations" in k and not torch.equal(expected[k].round(), start[k].round())]
    assert moved, "no location moved: the test would not see a wrong resume of the location phase"
