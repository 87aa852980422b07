from .config import FastFourierFTConfig
from .layer import FastFourierFTLinear
from .model import FastFourierFTModel

__all__ = ["FastFourierFTConfig", "FastFourierFTLinear", "FastFourierFTModel"]
