"""S2FT's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import SpectralConfig
from ..spectral import TRANSFORMS

PRIORS = ("gradient", "lora")
PRIOR_OPTIMIZERS = ("sgd", "adam")
PRIOR_LRS = {"sgd": 0.1, "adam": 1e-3}  # each optimizer's default warm-up learning rate (docs/s2ft.md)
# how rows and columns are reordered before the coefficients are placed: S2FT's nearest-neighbour chain, the
# identity (cells at the prior's own top DCT cells: the reordering switched off), or a seeded random permutation
ORDERINGS = ("nearest_neighbor", "none", "random")


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
            "help": "'lora' (default: it ordered a real MiniLM weight change better, docs/s2ft.md): a short LoRA "
            "warm-up; 'gradient': minus the summed gradient over prior_batches batches (cheaper)."
        },
    )
    prior_batches: int = field(default=8, metadata={"help": "Batches summed by the gradient prior."})
    prior_steps: int = field(default=50, metadata={"help": "Optimizer steps of the LoRA warm-up prior."})
    prior_rank: int = field(default=8, metadata={"help": "LoRA rank of the warm-up prior."})
    prior_optimizer: str = field(
        default="sgd",
        metadata={
            "help": "Optimizer of the LoRA warm-up: 'sgd' (default: plain steps, so the prior follows the gradient) "
            "or 'adam' (its prior ordered a real MiniLM weight change better, but points away from the first "
            "gradient step; docs/s2ft.md)."
        },
    )
    prior_lr: Optional[float] = field(
        default=None,
        metadata={"help": "Learning rate of the LoRA warm-up (default: 0.1 for 'sgd', 1e-3 for 'adam')."},
    )
    refine_passes: int = field(default=3, metadata={"help": "2-opt passes refining each greedy ordering (0: none)."})
    ordering: str = field(
        default="nearest_neighbor",
        metadata={
            "help": "How rows and columns are reordered from the prior: 'nearest_neighbor' (default, S2FT), 'none' "
            "(identity: coefficients at the top cells of the prior's own spectrum) or 'random' (a random "
            "permutation drawn from ordering_seed and the module's name; the ablation's control)."
        },
    )
    ordering_seed: int = field(default=0, metadata={"help": "Seed of ordering='random' (mixed with each module's name)."})

    def __post_init__(self):
        super().__post_init__()
        for field_name, choices in (
            ("transform", TRANSFORMS), ("prior", PRIORS), ("ordering", ORDERINGS), ("prior_optimizer", PRIOR_OPTIMIZERS),
        ):
            self._require_choice(field_name, choices)
        self._require_int("ordering_seed")
        for field_name in ("prior_batches", "prior_steps", "prior_rank"):
            self._require_int(field_name, minimum=1)
        self._require_int("refine_passes", minimum=0)
        if self.prior_lr is not None and (
            not isinstance(self.prior_lr, (int, float)) or isinstance(self.prior_lr, bool) or not self.prior_lr > 0
        ):
            raise ValueError(f"S2FTConfig.prior_lr must be a positive number or None, got {self.prior_lr!r}")

    @property
    def warm_up_lr(self) -> float:
        """The LoRA warm-up's learning rate: ``prior_lr``, or its optimizer's default."""
        return self.prior_lr if self.prior_lr is not None else PRIOR_LRS[self.prior_optimizer]
