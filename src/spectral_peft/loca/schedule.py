"""LoCA's alternating schedule, counted in optimizer steps.

Freezing never touches ``requires_grad``: under ``DistributedDataParallel`` (default arguments) every parameter
registered at wrap time must receive a gradient on every step. Instead a frozen part gets a zero gradient from the
layer, and whatever the optimizer still does to it (momentum, weight decay) is undone right after the step.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .config import LocaConfig
from .layer import LocaLinear

COEFFICIENTS, LOCATIONS, FINAL = "coefficients", "locations", "final"
# one learning rate of the locations, in cells per step, for the API (loca_param_groups) and the command line
DEFAULT_LOCATION_LR = 0.1
# with Adam a location moves at most about its learning rate per step: below half a cell in all it never rounds to
# another cell
_HALF_CELL = 0.5


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / accelerate wrappers keep the real model in .module
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config"):
        model = model.module
    return model


def _loca_adapters(model: nn.Module) -> dict[str, LocaConfig]:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError("LoCA schedule: expected a PEFT model (from get_peft_model) with a LocaConfig adapter")
    adapters = {name: cfg for name, cfg in configs.items() if isinstance(cfg, LocaConfig)}
    if not adapters:
        raise ValueError("LoCA schedule: the model has no LoCA adapter")
    return adapters


def default_schedule(coefficient_steps: int, location_steps: int, total_steps: int) -> tuple[int, int, int]:
    """``(coefficient_steps, location_steps, location_learning_steps)`` for a config whose
    ``location_learning_steps`` is None, in a run of ``total_steps`` optimizer steps.

    Locations learn during 10% of the run, but never less than one full cycle (``coefficient_steps`` then
    ``location_steps``): a short run still learns its locations. Where one cycle is longer than half the run, the
    cycle is shrunk to half the run in the same ratio (at least one coefficient step first, since a location's
    gradient is proportional to its coefficient, zero at the start, and one location step), so the coefficients
    still train alone in the second half. A run of fewer than 4 steps learns no location.
    """
    cycle = coefficient_steps + location_steps
    if location_steps == 0:
        return coefficient_steps, location_steps, int(0.1 * total_steps)
    window = max(int(0.1 * total_steps), cycle)
    half = total_steps // 2
    if window <= half:
        return coefficient_steps, location_steps, window
    if half < 2:
        return coefficient_steps, location_steps, 0
    locations = min(half - 1, max(1, round(half * location_steps / cycle)))
    return half - locations, locations, half


def location_step_count(coefficient_steps: int, location_steps: int, location_learning_steps: int) -> int:
    """How many optimizer steps train locations under this schedule."""
    cycle = coefficient_steps + location_steps
    full, rest = divmod(location_learning_steps, cycle)
    return full * location_steps + max(0, rest - coefficient_steps)


def phase_at(step: int, coefficient_steps: int, location_steps: int, location_learning_steps: int) -> str:
    """The phase of optimizer step ``step`` (0-based)."""
    if step >= location_learning_steps:
        return FINAL
    position = step % (coefficient_steps + location_steps)
    return COEFFICIENTS if position < coefficient_steps else LOCATIONS


class LocaSchedule:
    """Alternates what LoCA trains. Call :meth:`step` once after every ``optimizer.step()``.

    Args:
        model: the PEFT model (or a ``DistributedDataParallel`` wrapping it).
        total_steps: total optimizer steps of the run; with ``location_learning_steps=None`` in the config,
            locations learn for 10% of it but at least one full cycle (:func:`default_schedule`, which shrinks the
            cycle of a run shorter than two cycles).

    A schedule under which no location can move (no location step, other than by ``location_learning_steps=0``,
    the way to freeze locations on purpose) warns (``UserWarning``); :meth:`check_location_lr` warns where the
    location learning rate is too small for any location to reach another cell.
    """

    def __init__(self, model: nn.Module, total_steps: Optional[int] = None):
        root = _unwrap(model)
        self.adapters = _loca_adapters(root)
        self.bounds = {}
        for name, cfg in self.adapters.items():
            learning_steps = cfg.location_learning_steps
            if learning_steps is None:
                if total_steps is None:
                    raise ValueError(
                        f"LoCA adapter '{name}': location_learning_steps is None and LocaSchedule got no "
                        "total_steps; pass total_steps (locations then learn for its first 10%) or set "
                        "LocaConfig.location_learning_steps"
                    )
                self.bounds[name] = default_schedule(cfg.coefficient_steps, cfg.location_steps, total_steps)
            else:
                self.bounds[name] = (cfg.coefficient_steps, cfg.location_steps, learning_steps)
            coefficient_steps, location_steps, window = self.bounds[name]
            if self.location_steps(name) == 0 and learning_steps != 0:
                warnings.warn(
                    f"LoCA adapter '{name}': no optimizer step of this schedule trains locations (coefficient_steps "
                    f"{coefficient_steps}, location_steps {location_steps}, location_learning_steps "
                    f"{window}{'' if total_steps is None else f', total_steps {total_steps}'}), so "
                    "every location stays at its random start; give location_learning_steps more than "
                    "coefficient_steps (or None), or set it to 0 to freeze locations on purpose",
                    UserWarning, stacklevel=2,
                )
        self.layers = [
            (layer, name) for layer in root.modules() if isinstance(layer, LocaLinear)
            for name in self.adapters if name in layer.loca_coefficients
        ]
        self.step_count = 0
        self._snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._apply()

    def location_steps(self, adapter_name: Optional[str] = None) -> int:
        """How many optimizer steps of the run train the locations of ``adapter_name`` (default: the first)."""
        return location_step_count(*self._bounds_of(adapter_name))

    def check_location_lr(self, location_lr: float) -> Optional[str]:
        """A warning (also returned) when ``location_lr`` times the location steps is under half a cell: with Adam a
        location then never rounds to another cell. None when locations can move (or are frozen on purpose)."""
        for name in self.bounds:
            steps = self.location_steps(name)
            if steps and location_lr * steps < _HALF_CELL:
                message = (f"LoCA adapter '{name}': location_lr {location_lr:g} cells per step over its {steps} "
                           f"location steps moves a location at most about {location_lr * steps:.2g} cells, under "
                           "the half cell it needs to reach another one: no location will move; raise location_lr "
                           "or the location steps")
                warnings.warn(message, UserWarning, stacklevel=2)
                return message
        return None

    def phase(self, adapter_name: Optional[str] = None) -> str:
        """The phase of the coming optimizer step: 'coefficients', 'locations' or 'final'."""
        return phase_at(self.step_count, *self._bounds_of(adapter_name))

    def _bounds_of(self, adapter_name: Optional[str]) -> tuple:
        """(coefficient_steps, location_steps, location_learning_steps) of ``adapter_name`` (default: the first)."""
        return self.bounds[adapter_name if adapter_name is not None else next(iter(self.bounds))]

    def step(self) -> None:
        """Account for one optimizer step and set up the next one."""
        with torch.no_grad():
            for param, value in self._snapshots:
                param.copy_(value)
        # take (or refuse) the step's location moves under the phase that made them, before switching
        for layer, name in self.layers:
            layer.commit_locations(name)
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        self._snapshots = []
        for layer, name in self.layers:
            phase = self.phase(name)
            train_coefficients, train_locations = phase != LOCATIONS, phase == LOCATIONS
            layer.set_phase(name, train_coefficients, train_locations)
            frozen = []
            if not train_coefficients:
                frozen.append(layer.loca_coefficients[name])
            if not train_locations:
                frozen.append(layer.loca_locations[name])
            self._snapshots += [(p, p.detach().clone()) for p in frozen]

    def state_dict(self) -> dict:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        if "step" not in state or not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"LocaSchedule.load_state_dict: expected {{'step': int >= 0}}, got {state!r}")
        self.step_count = state["step"]
        self._apply()


def loca_param_groups(
    model: nn.Module, lr: float, location_lr: float = DEFAULT_LOCATION_LR, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups: LoCA locations in a group of their own (``location_lr``, no weight decay).

    ``location_lr`` is in cell units: with Adam a location moves about ``location_lr`` cells per step while its
    gradient keeps its sign.
    """
    locations, others = [], []
    for name, param in _unwrap(model).named_parameters():
        if param.requires_grad:
            (locations if "loca_locations" in name else others).append(param)
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay}]
    if locations:
        groups.append({"params": locations, "lr": location_lr, "weight_decay": 0.0})
    return groups
