"""S2FT: fine-tuning in a row/column-permuted domain where the weight change's spectrum is sparse."""

from .config import S2FTConfig
from .layer import S2FTLinear
from .model import S2FTModel
from .ordering import nearest_neighbor_order, pairwise_sq_distances
from .prepare import gradient_prior, lora_prior, prepare_s2ft, prior_orders, summed_gradients, top_cells

__all__ = [
    "S2FTConfig", "S2FTLinear", "S2FTModel", "gradient_prior", "lora_prior", "nearest_neighbor_order",
    "pairwise_sq_distances", "prepare_s2ft", "prior_orders", "summed_gradients", "top_cells",
]
