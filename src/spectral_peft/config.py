"""Fields every sparse-spectrum method shares, with PEFT's usual targeting options."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import CONFIG_NAME

from .adapter_files import atomic_write, checksum_of_folder


class MethodType(str):
    """A method's PEFT type: a plain string (PEFT looks its mappings up by string) that also answers ``.value`` and
    ``.name``, which PEFT reads on the members of its own ``PeftType`` enum (model cards, mixed models, errors)."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)


def _is_str_list(value) -> bool:
    return isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value)


@dataclass
class SpectralConfig(PeftConfig):
    """Base configuration of a sparse-spectrum adapter. Methods subclass it and set ``PEFT_TYPE``.

    ``loaded_from`` (not a field, never saved): the local folder :meth:`from_pretrained` read this config from, whose
    weights the tuner checks against the model before wrapping it; None otherwise.
    """

    PEFT_TYPE = ""
    loaded_from: ClassVar[Optional[str]] = None  # set per instance; ClassVar keeps it out of the saved fields

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
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: coefficients start at zero, so the adapted model starts as the base model; False: "
                  "standard normal (PEFT's convention for starting an adapter away from the identity)."},
    )
    weights_checksum: Optional[str] = field(
        default=None,
        metadata={"help": "Set by save_pretrained: SHA-256 of the weights saved with this config, checked at load."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MethodType(self.PEFT_TYPE)
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
        self._check_types(name)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(f"{name}: layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(f"{name}: layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{name}: layers_pattern needs layers_to_transform")

    def _require_int(self, field_name: str, minimum: Optional[int] = None, optional: bool = False) -> None:
        """Raise a ValueError naming the config and field unless it holds an integer (>= ``minimum``; or None)."""
        value = getattr(self, field_name)
        if optional and value is None:
            return
        if isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum):
            return
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{type(self).__name__}.{field_name} must be {'None or ' if optional else ''}{expected}, got {value!r}")

    def _require_choice(self, field_name: str, choices) -> None:
        value = getattr(self, field_name)
        if value not in choices:
            raise ValueError(f"{type(self).__name__}.{field_name} must be one of {tuple(choices)}, got {value!r}")

    def _check_types(self, name: str) -> None:
        # values read from a hand-edited adapter_config.json: a wrong type must not reach PEFT's injection, where
        # it fails obscurely or not at all (fan_in_fan_out="no" is truthy)
        prefix = type(self).PEFT_TYPE.lower() + "_"
        checks = {
            "target_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "None, a string or a list of strings"),
            "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "None, a string or a list of strings"),
            "modules_to_save": (lambda v: v is None or _is_str_list(v), "None or a list of strings"),
            "layers_to_transform": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)) or (
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)), "None, an integer or a list of integers"),
            "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "None, a string or a list of strings"),
            "n_frequency_pattern": (lambda v: v is None or isinstance(v, dict), "a dict"),
            "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
            "init_weights": (lambda v: isinstance(v, bool), "true or false"),
            "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
            "bias": (lambda v: v in ("none", "all", prefix + "only"), f"'none', 'all' or '{prefix}only'"),
            "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "None or a string"),
            "revision": (lambda v: v is None or isinstance(v, str), "None or a string"),
            "task_type": (lambda v: v is None or isinstance(v, str), "None or a string"),
            "weights_checksum": (lambda v: v is None or isinstance(v, str), "None or a string"),
        }
        for field_name, (ok, expected) in checks.items():
            value = getattr(self, field_name)
            if not ok(value):
                raise ValueError(f"{name}.{field_name} must be {expected}, got {value!r}")

    @classmethod
    def check_kwargs(cls, **kwargs):
        # PEFT drops unknown fields with a warning (for configs from newer PEFT versions); for our methods an
        # unknown field is a typo or another method's config, and would be silently ignored
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            owners = [c.__name__ for c in set(PEFT_TYPE_TO_CONFIG_MAPPING.values())
                      if dataclasses.is_dataclass(c) and c is not cls and set(unknown) <= {f.name for f in dataclasses.fields(c)}]
            hint = f" (fields of {', '.join(sorted(owners))}: is this another method's adapter?)" if owners else ""
            raise ValueError(f"{cls.__name__} has no field {', '.join(repr(u) for u in unknown)}{hint}")
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's, with errors naming the file. For a local folder the config remembers it (``loaded_from``, not
        saved): the tuner reads the weights beside it and checks them against each target module before it wraps
        anything."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        config_file = os.path.join(folder, CONFIG_NAME)
        local = os.path.isfile(config_file)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (ValueError, TypeError) as error:
            if not local:
                raise
            raise ValueError(f"{config_file}: {error}") from None
        config.loaded_from = folder if local else None
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's layout, written to a temporary file and renamed into place, with the checksum of the weights PEFT
        has just written beside it (``weights_checksum``), so that weights without their config never load."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        output = {k: list(v) if isinstance(v, set) else v for k, v in self.to_dict().items()}
        output["weights_checksum"] = checksum_of_folder(save_directory)
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            output["auto_mapping"] = auto_mapping
        text = json.dumps(output, indent=2, sort_keys=True)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(os.path.join(save_directory, CONFIG_NAME), write)
