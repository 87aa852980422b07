"""LoCA's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import SpectralConfig


@dataclass
class LocaConfig(SpectralConfig):
    """Location-aware Cosine Adaptation: ``n_frequency`` DCT coefficients per matrix at learned locations.

    The schedule (:class:`~spectral_peft.LocaSchedule`) alternates ``coefficient_steps`` optimizer steps training
    coefficients only with ``location_steps`` training locations only, for the first ``location_learning_steps``
    steps; then locations are frozen and coefficients train to the end. ``location_learning_steps=None`` gives every
    run at least one full cycle (:func:`~spectral_peft.loca.schedule.default_schedule`); 0 freezes the locations
    at their random start.
    """

    PEFT_TYPE = "LOCA"

    coefficient_steps: int = field(default=10, metadata={"help": "B_a: coefficient-only steps per cycle."})
    location_steps: int = field(default=20, metadata={"help": "B_l: location-only steps per cycle."})
    location_learning_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "B_s: optimizer steps during which locations may move. None: 10% of the total steps given "
            "to LocaSchedule, but at least one full cycle (in a run shorter than two cycles the cycle shrinks to "
            "half the run). 0: locations stay at their random start."
        },
    )
    location_seed: Optional[int] = field(
        default=None,
        metadata={"help": "Seed of the initial random locations (mixed with each module's name); None: torch's RNG."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._require_int("coefficient_steps", minimum=0)
        self._require_int("location_steps", minimum=0)
        if self.coefficient_steps + self.location_steps == 0:
            raise ValueError("LocaConfig: coefficient_steps and location_steps cannot both be 0")
        self._require_int("location_learning_steps", minimum=0, optional=True)
        self._require_int("location_seed", optional=True)
