"""Fields every sparse-spectrum method shares, with PEFT's usual targeting options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig


@dataclass
class SpectralConfig(PeftConfig):
    """Base configuration of a sparse-spectrum adapter. Methods subclass it and set ``PEFT_TYPE``."""

    PEFT_TYPE = ""

    n_frequency: int = field(default=1000, metadata={"help": "Trainable spectral coefficients per target matrix."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier of the weight change dW."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (or a regex) to adapt, e.g. ['query', 'value']. Defaults to the attention "
            "projections PEFT uses for LoRA on known architectures."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (or a regex) not to adapt."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Whether the target layers store weights as (fan_in, fan_out), as GPT-2's Conv1D; detected."},
    )
    bias: str = field(default="none", metadata={"help": "Biases to train: 'none', 'all' or '<method>_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save, e.g. a classification head."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indexes."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."}
    )
    n_frequency_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": "Per-module n_frequency overriding the default, keyed by module name or regex."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = self.PEFT_TYPE
        name = type(self).__name__
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.n_frequency, int) or isinstance(self.n_frequency, bool) or self.n_frequency <= 0:
            raise ValueError(f"{name}.n_frequency must be a positive integer, got {self.n_frequency!r}")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ValueError(f"{name}.scaling must be a number, got {self.scaling!r}")
        for key, value in (self.n_frequency_pattern or {}).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}.n_frequency_pattern[{key!r}] must be a positive integer, got {value!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(f"{name}: layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(f"{name}: layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{name}: layers_pattern needs layers_to_transform")
