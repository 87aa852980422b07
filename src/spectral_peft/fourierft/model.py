"""Fast FourierFT as a PEFT tuner."""

from peft.utils import TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING

from ..model import SpectralModel
from .layer import FastFourierFTLinear


class FastFourierFTModel(SpectralModel):
    prefix = "fastfourierft_"
    tuner_layer_cls = FastFourierFTLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING
