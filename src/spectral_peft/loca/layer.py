"""LoCA's layer: the shared spectral layer with learnable locations, first drawn uniformly at random."""

from __future__ import annotations

import zlib

import torch

from ..layer import SpectralLinear
from ..spectral import random_cells


class LocaLinear(SpectralLinear):
    prefix = "loca_"
    learnable_locations = True

    def initial_cells(self, adapter_name: str, n: int, config) -> torch.Tensor:
        generator = None
        if config.location_seed is not None:
            # a different draw per module, reproducible from the one seed
            generator = torch.Generator().manual_seed(config.location_seed ^ zlib.crc32(self.module_name.encode()))
        return random_cells(self.shape, n, generator)
