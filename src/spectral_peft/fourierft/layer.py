"""The fast FourierFT layer: DFT transform, stock PEFT's random locations, re-drawn from the seed at load."""

from __future__ import annotations

import torch

from ..layer import SpectralLinear
from ..spectral import random_cells


class FastFourierFTLinear(SpectralLinear):
    prefix = "fastfourierft_"
    saves_locations = False
    default_transform = "dft"

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        self.fastfourierft_random_loc_seed[adapter_name] = config.random_loc_seed
        super().update_layer(adapter_name, config, **kwargs)

    def initial_cells(self, adapter_name: str, n: int, config) -> torch.Tensor:
        return self._draw(n, config.random_loc_seed)

    def _draw(self, n: int, seed: int) -> torch.Tensor:
        # exactly stock PEFT's draw: randperm(out * in, seed)[:n] as (index // in, index % in)
        return random_cells(self.shape, n, torch.Generator().manual_seed(seed))

    def initial_coefficients(self, n: int, config) -> torch.Tensor:
        # stock draws randn from the global RNG after the locations, and zeroes it if init_weights
        coefficients = torch.randn(n)
        return torch.zeros(n) if config.init_weights else coefficients

    def _apply(self, fn, recurse=True):
        # A model moved to "meta" and materialised again (``to_empty``, as FSDP and deferred initialisation do)
        # holds uninitialised memory in every buffer; load_state_dict restores what was saved, and these locations,
        # which are not saved, are drawn again from their seed.
        locations = self.fastfourierft_locations
        was_meta = {name for name, cells in locations.items() if cells.device.type == "meta"}
        super()._apply(fn, recurse)
        for name in was_meta:
            if locations[name].device.type != "meta":
                cells = self._draw(locations[name].shape[1], self.fastfourierft_random_loc_seed[name])
                locations[name] = cells.to(locations[name].device)
        return self
