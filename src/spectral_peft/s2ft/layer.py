"""S2FT's layer: the shared spectral layer with saved row/column orderings and fixed locations."""

from __future__ import annotations

import torch

from ..layer import SpectralLinear
from ..spectral import random_cells


class S2FTLinear(SpectralLinear):
    prefix = "s2ft_"
    has_orders = True

    def initial_cells(self, adapter_name: str, n: int, config) -> torch.Tensor:
        # placeholders until prepare_s2ft (or a loaded adapter) sets the real ones
        return random_cells(self.shape, n, torch.Generator().manual_seed(0))
