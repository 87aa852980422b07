"""LoCA as a PEFT tuner."""

from ..model import SpectralModel
from .layer import LocaLinear


class LocaModel(SpectralModel):
    prefix = "loca_"
    tuner_layer_cls = LocaLinear
