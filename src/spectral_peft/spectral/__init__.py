"""The sparse-spectrum update ``dW = scaling * P_row^T (T_M^T S T_N) P_col^T`` and its three ways of computing.

* The activation path (:mod:`.activation`; wide layers on a CPU) applies the update to activations: a real FFT of
  the input features, one sparse product into the output's half spectrum, an inverse real FFT.
* The dense path (:mod:`.spectrum`) builds ``dW`` (merging; small layers with many tokens; a layer may add it to its
  frozen weight so that its own product carries it, and then read the gradients off the activations' half spectra:
  :func:`.activation.folded_linear`).
* The factored path (:mod:`.factored`) multiplies by the coefficients' basis vectors, two products as thin as their
  number (layers on a GPU).

:mod:`.paths` chooses between them by a cost estimate; :mod:`.cache` holds what they keep between calls.
"""

from ..transforms import inverse_order
from .activation import apply_delta, can_own_product, folded_linear, linear_with_delta
from .cache import Placement, PlacementCache, Workspace
from .cells import check_cells, check_permutation, module_generator, random_cells
from .factored import factored_forward
from .paths import DELTA_PRODUCTS, choose_path
from .spectrum import TRANSFORMS, Spectrum, delta_weight, dense_forward

__all__ = [
    "DELTA_PRODUCTS", "Placement", "PlacementCache", "Spectrum", "TRANSFORMS", "Workspace", "apply_delta",
    "can_own_product", "check_cells", "check_permutation", "choose_path", "delta_weight", "dense_forward",
    "factored_forward", "folded_linear", "inverse_order", "linear_with_delta", "module_generator", "random_cells",
]
