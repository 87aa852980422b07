"""LoCA's alternating schedule, counted in optimizer steps.

Freezing never touches ``requires_grad``: under ``DistributedDataParallel`` (default arguments) every parameter
registered at wrap time must receive a gradient on every step. Instead a frozen part gets a zero gradient from the
layer, and whatever the optimizer still does to it (momentum, weight decay) is undone right after the step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import LocaConfig
from .layer import LocaLinear

COEFFICIENTS, LOCATIONS, FINAL = "coefficients", "locations", "final"


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
        total_steps: total optimizer steps of the run; ``location_learning_steps=None`` in the config means 10%
            of it.
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
                learning_steps = int(0.1 * total_steps)
            self.bounds[name] = (cfg.coefficient_steps, cfg.location_steps, learning_steps)
        self.layers = [
            (layer, name) for layer in root.modules() if isinstance(layer, LocaLinear)
            for name in self.adapters if name in layer.loca_coefficients
        ]
        self.step_count = 0
        self._snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._apply()

    def phase(self, adapter_name: Optional[str] = None) -> str:
        """The phase of the coming optimizer step: 'coefficients', 'locations' or 'final'."""
        name = adapter_name if adapter_name is not None else next(iter(self.bounds))
        return phase_at(self.step_count, *self.bounds[name])

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
    model: nn.Module, lr: float, location_lr: float = 0.05, weight_decay: float = 0.0
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
