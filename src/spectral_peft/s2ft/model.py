"""S2FT as a PEFT tuner."""

from ..model import SpectralModel
from .layer import S2FTLinear


class S2FTModel(SpectralModel):
    prefix = "s2ft_"
    tuner_layer_cls = S2FTLinear
