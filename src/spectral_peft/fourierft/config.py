"""Configuration of the fast FourierFT mode: stock PEFT's FourierFTConfig fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import SpectralConfig


@dataclass
class FastFourierFTConfig(SpectralConfig):
    """FourierFT (random fixed DFT locations, real part of ``ifft2``) computed without a dense ``dW`` in training.

    Same fields and defaults as ``peft.FourierFTConfig``: with the same ``random_loc_seed`` the i-th entry of
    ``fastfourierft_coefficients`` sits at the i-th location of stock PEFT's draw, so copying a stock model's
    ``fourierft_spectrum`` in gives the same model.
    """

    PEFT_TYPE = "FASTFOURIERFT"

    scaling: float = field(default=150.0, metadata={"help": "Multiplier of dW = Re(ifft2(S)) (stock default 150)."})
    random_loc_seed: Optional[int] = field(default=777, metadata={"help": "Seed of the random locations."})
    init_weights: bool = field(
        default=False,
        metadata={"help": "True: coefficients start at zero; False (stock default): standard normal."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._require_int("random_loc_seed")
