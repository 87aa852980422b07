"""The fast FourierFT layer: DFT transform, stock PEFT's random locations, re-drawn from the seed at load."""

from __future__ import annotations

import torch

from ..layer import SpectralLinear
from ..spectral import random_cells


class FastFourierFTLinear(SpectralLinear):
    prefix = "fastfourierft_"
    saves_locations = False
    default_transform = "dft"

    def initial_cells(self, adapter_name: str, n: int, config) -> torch.Tensor:
        # exactly stock PEFT's draw: randperm(out * in, seed)[:n] as (index // in, index % in)
        return random_cells(self.shape, n, torch.Generator().manual_seed(config.random_loc_seed))

    def initial_coefficients(self, n: int, config) -> torch.Tensor:
        # stock draws randn from the global RNG after the locations, and zeroes it if init_weights
        coefficients = torch.randn(n)
        return torch.zeros(n) if config.init_weights else coefficients
