"""spectral-peft: sparse-spectrum adapters (LoCA, S2FT, fast FourierFT) for Hugging Face PEFT.

Importing the package registers its methods with stock PEFT, so ``get_peft_model(model, LocaConfig(...))``,
``PeftModel.from_pretrained`` and the rest work as for PEFT's own methods.
"""

from .loca import LocaCallback, LocaConfig, LocaModel, LocaSchedule, loca_param_groups
from .model import register_method

register_method(LocaConfig, LocaModel)

__version__ = "0.1.0"

__all__ = ["LocaCallback", "LocaConfig", "LocaModel", "LocaSchedule", "loca_param_groups", "register_method"]
