"""S2FT's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import SpectralConfig
from ..spectral import TRANSFORMS

PRIORS = ("gradient", "lora")
PRIOR_OPTIMIZERS = ("adam", "sgd")


@dataclass
class S2FTConfig(SpectralConfig):
    """Sparse-spectrum fine-tuning: coefficients in a row/column-permuted domain where the update is smooth.

    Build the model with :func:`spectral_peft.prepare_s2ft`, which estimates a prior weight change, orders rows
    and columns from it and places the ``n_frequency`` coefficients where the permuted prior's spectrum is largest.
    """

    PEFT_TYPE = "S2FT"

    transform: str = field(default="dct", metadata={"help": "'dct' (default) or 'dft'."})
    prior: str = field(
        default="lora",
        metadata={
            "help": "'lora' (default: it ordered real MiniLM weight changes better, docs/s2ft.md): a short LoRA "
            "warm-up; 'gradient': minus the summed gradient over prior_batches batches (cheaper)."
        },
    )
    prior_batches: int = field(default=8, metadata={"help": "Batches summed by the gradient prior."})
    prior_steps: int = field(default=50, metadata={"help": "Optimizer steps of the LoRA warm-up prior."})
    prior_rank: int = field(default=8, metadata={"help": "LoRA rank of the warm-up prior."})
    prior_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the LoRA warm-up prior."})
    prior_optimizer: str = field(
        default="adam",
        metadata={
            "help": "Optimizer of the LoRA warm-up: 'adam' (default: it ordered real MiniLM weight changes better) or "
            "'sgd' (plain steps: the prior follows the first gradient steps closely); docs/s2ft.md."
        },
    )
    refine_passes: int = field(default=3, metadata={"help": "2-opt passes refining each greedy ordering (0: none)."})

    def __post_init__(self):
        super().__post_init__()
        if self.transform not in TRANSFORMS:
            raise ValueError(f"S2FTConfig.transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"S2FTConfig.prior must be one of {PRIORS}, got {self.prior!r}")
        if self.prior_optimizer not in PRIOR_OPTIMIZERS:
            raise ValueError(f"S2FTConfig.prior_optimizer must be one of {PRIOR_OPTIMIZERS}, got {self.prior_optimizer!r}")
        for name in ("prior_batches", "prior_steps", "prior_rank", "refine_passes"):
            value = getattr(self, name)
            minimum = 0 if name == "refine_passes" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"S2FTConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.prior_lr, (int, float)) or self.prior_lr <= 0:
            raise ValueError(f"S2FTConfig.prior_lr must be a positive number, got {self.prior_lr!r}")
