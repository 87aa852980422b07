"""spectral-peft: sparse-spectrum adapters (LoCA, S2FT, fast FourierFT) for Hugging Face PEFT.

Importing the package registers its methods with stock PEFT, so ``get_peft_model(model, LocaConfig(...))``,
``PeftModel.from_pretrained`` and the rest work as for PEFT's own methods.
"""

from .fourierft import FastFourierFTConfig, FastFourierFTModel
from .loca import LocaCallback, LocaConfig, LocaModel, LocaSchedule, loca_param_groups
from .model import register_method
from .s2ft import S2FTConfig, S2FTModel, nearest_neighbor_order, prepare_s2ft

register_method(LocaConfig, LocaModel)
register_method(S2FTConfig, S2FTModel)
register_method(FastFourierFTConfig, FastFourierFTModel)

__version__ = "0.1.0"

__all__ = [
    "FastFourierFTConfig", "LocaCallback", "LocaConfig", "LocaSchedule", "S2FTConfig", "loca_param_groups",
    "nearest_neighbor_order", "prepare_s2ft", "register_method",
]
