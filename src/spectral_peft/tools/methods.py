"""The methods the commands train, compare and time: one registry that ``finetune``, ``compare`` and ``bench`` read.

Each :class:`Method` says what sizes its update (its budget), its default learning rate and scaling, how it is put
on a base model and how its trainable parameters are grouped for the optimizer. Importing this module imports
neither torch nor PEFT (the command line's help is built from it); the builders import what they need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

# what sizes a method's update: spectral coefficients per matrix, a LoRA rank, or nothing (every weight trains)
N_FREQUENCY, RANK, NO_BUDGET = "n_frequency", "rank", "none"
# PEFT's lora_alpha when --scaling is not given, whatever the rank
LORA_DEFAULT_ALPHA = 8
# the method bench takes every ratio to
REFERENCE = "lora"
# bench's row for the frozen base model with only its head training
BASE = "base"
BASE_LABEL = "base model (head only)"


def adapter_parameter_kind(name: str, head: Optional[str]) -> str:
    """An adapter's parameter: the classification head's copy (PEFT's modules_to_save) or the update."""
    return "head" if head is not None and "modules_to_save" in name else "update"


def _loca_parameter_kind(name: str, head: Optional[str]) -> str:
    # LoCA's locations get their own learning rate (in cells per step) and no weight decay
    return "locations" if "loca_locations" in name else adapter_parameter_kind(name, head)


def _full_parameter_kind(name: str, head: Optional[str]) -> str:
    # full fine-tuning trains the model itself: its head is the top-level module of that name
    return "head" if head is not None and name.split(".")[0] == head else "update"


def _config(config_class, **fields):
    """``config_class(**fields)`` without the fields that are None, which then take the class's own defaults."""
    return config_class(**{key: value for key, value in fields.items() if value is not None})


def _build_lora(base, settings: Mapping, peft_fields: dict, prior_batches=None):
    from peft import LoraConfig, get_peft_model

    scaling = settings.get("scaling")
    alpha = LORA_DEFAULT_ALPHA if scaling is None else scaling * settings["rank"]
    return get_peft_model(base, _config(LoraConfig, r=settings["rank"], lora_alpha=alpha, **peft_fields))


def _build_fourierft(base, settings: Mapping, peft_fields: dict, prior_batches=None):
    from peft import FourierFTConfig, get_peft_model

    config = _config(FourierFTConfig, n_frequency=settings["n_frequency"], scaling=settings.get("scaling"),
                     **peft_fields)
    return get_peft_model(base, config)


def _build_fastfourierft(base, settings: Mapping, peft_fields: dict, prior_batches=None):
    from peft import get_peft_model

    from spectral_peft import FastFourierFTConfig

    config = _config(FastFourierFTConfig, n_frequency=settings["n_frequency"], scaling=settings.get("scaling"),
                     **peft_fields)
    return get_peft_model(base, config)


def _build_loca(base, settings: Mapping, peft_fields: dict, prior_batches=None):
    from peft import get_peft_model

    from spectral_peft import LocaConfig

    config = _config(
        LocaConfig, n_frequency=settings["n_frequency"], scaling=settings.get("scaling"),
        coefficient_steps=settings.get("loca_coefficient_steps"), location_steps=settings.get("loca_location_steps"),
        location_learning_steps=settings.get("location_learning_steps"), location_seed=settings.get("seed"),
        **peft_fields,
    )
    return get_peft_model(base, config)


def _build_s2ft(base, settings: Mapping, peft_fields: dict, prior_batches=None):
    """``prior_batches`` None builds S2FT without a prior (a resumed run's orders and locations come from its
    checkpoint)."""
    from peft import get_peft_model

    from spectral_peft import S2FTConfig, prepare_s2ft

    # a run.json from before --s2ft-prior-optimizer existed has no such key: S2FTConfig's default then
    config = _config(
        S2FTConfig, n_frequency=settings["n_frequency"], scaling=settings.get("scaling"),
        prior=settings.get("s2ft_prior"), prior_batches=settings.get("prior_batches"),
        transform=settings.get("s2ft_transform"), prior_optimizer=settings.get("s2ft_prior_optimizer"),
        ordering=settings.get("s2ft_ordering"), ordering_seed=settings.get("seed"),
        **peft_fields,
    )
    if prior_batches is None:
        return get_peft_model(base, config)
    from .progress import track  # the prior's and the orderings' progress, in a log too

    return prepare_s2ft(base, config, prior_batches, progress=track)


def _build_full(base, settings: Mapping, peft_fields: dict, prior_batches=None):
    for param in base.parameters():
        param.requires_grad_(True)
    return base


def _fill_s2ft_settings(settings: dict) -> None:
    """S2FT's prior options not given take S2FTConfig's defaults, so that run.json says which were used."""
    import dataclasses

    from spectral_peft import S2FTConfig

    defaults = {field.name: field.default for field in dataclasses.fields(S2FTConfig)}
    for key, field in (("s2ft_prior", "prior"), ("s2ft_prior_optimizer", "prior_optimizer"),
                       ("s2ft_ordering", "ordering")):
        if settings.get(key) is None:
            settings[key] = defaults[field]


def _loca_schedule(model, total_steps: int):
    from spectral_peft import LocaSchedule

    return LocaSchedule(model, total_steps=total_steps)


@dataclass(frozen=True)
class Method:
    """One method of the command line."""

    name: str
    label: str  # in a run's log
    budget: str  # N_FREQUENCY, RANK or NO_BUDGET
    # default learning rate of the update (coefficients, LoRA matrices, or every weight for `full`)
    lr: float
    scaling: Optional[float]  # default --scaling; None: the library's own
    # (base, settings, peft_fields, prior_batches) -> the model to train; settings as finetune resolves them (a
    # missing or None entry takes the method's config default), peft_fields: target_modules, modules_to_save, task_type
    build: Callable
    parameter_kind: Callable[[str, Optional[str]], str] = adapter_parameter_kind  # (name, head) -> optimizer group
    own_settings: tuple = ()  # the settings only this method reads: not part of the other methods' runs
    uses_prior: bool = False  # the run's first training batches are given to `build` (S2FT's prior)
    schedule: Optional[Callable] = None  # (model, total_steps) -> stepped after every optimizer step
    fill_settings: Optional[Callable[[dict], None]] = None  # fills in the defaults of its own settings
    # what bench times of it: variant -> its label in bench's tables (None: the method itself, under its label)
    bench_variants: Optional[Mapping[str, str]] = None
    # an ablation: the method it is a variant of (its build, defaults and own settings) and the settings it fixes,
    # whatever the command line says (e.g. LoCA with location_learning_steps 0: locations frozen at their start)
    variant_of: Optional[str] = None
    presets: Optional[Mapping[str, object]] = None

    def timed_variants(self) -> dict:
        return dict(self.bench_variants) if self.bench_variants is not None else {self.name: self.label}


# learning rates from a short check on MiniLM + BBC News; docs/results.md tunes x1/3, x1, x3 of these on validation
# (benchmarks/results_grid.py). With the orthonormal DCT one coefficient's atom has unit Frobenius norm, so LoCA /
# S2FT at scaling 1 need about 1e-2.
_METHODS = (
    Method("loca", "LoCA", N_FREQUENCY, lr=1e-2, scaling=1.0, build=_build_loca,
           parameter_kind=_loca_parameter_kind, schedule=_loca_schedule,
           own_settings=("location_lr", "loca_coefficient_steps", "loca_location_steps", "location_learning_steps"),
           bench_variants={"loca": "LoCA, coefficient phase", "loca-locations": "LoCA, location phase"}),
    Method("s2ft", "S2FT", N_FREQUENCY, lr=1e-2, scaling=1.0, build=_build_s2ft, uses_prior=True,
           fill_settings=_fill_s2ft_settings,
           own_settings=("s2ft_prior", "prior_batches", "s2ft_prior_optimizer", "s2ft_transform", "s2ft_ordering")),
    Method("fourierft", "FourierFT (stock PEFT)", N_FREQUENCY, lr=5e-2, scaling=150.0, build=_build_fourierft),
    Method("fastfourierft", "fast FourierFT", N_FREQUENCY, lr=5e-2, scaling=150.0, build=_build_fastfourierft,
           bench_variants={"fastfourierft": "FourierFT mode (ours)"}),
    Method("lora", "LoRA (stock PEFT)", RANK, lr=1e-3, scaling=None, build=_build_lora),
    Method("full", "full fine-tuning", NO_BUDGET, lr=5e-5, scaling=None, build=_build_full,
           parameter_kind=_full_parameter_kind, bench_variants={}),
)


def _ablation(of: Method, name: str, label: str, **presets) -> Method:
    """A variant of ``of`` with one mechanism switched off (``presets``), for the ablations of docs/results.md;
    bench does not time it (its layers are the method's own)."""
    return dataclasses.replace(of, name=name, label=label, variant_of=of.name, presets=presets, bench_variants={})


_LOCA, _S2FT = _METHODS[0], _METHODS[1]
# the ablations: each is its method with one mechanism switched off, at the same number of coefficients
_ABLATIONS = (
    _ablation(_LOCA, "loca-frozen", "LoCA, locations frozen at their random start", location_learning_steps=0),
    _ablation(_S2FT, "s2ft-unordered", "S2FT without reordering (the prior's own top DCT cells)",
              s2ft_ordering="none"),
    _ablation(_S2FT, "s2ft-random", "S2FT with a random reordering", s2ft_ordering="random"),
    _ablation(_S2FT, "dct-prior", "top-n DCT cells of a gradient prior, fixed (no reordering, no location learning)",
              s2ft_prior="gradient", s2ft_ordering="none"),
)
METHODS: dict[str, Method] = {method.name: method for method in _METHODS + _ABLATIONS}
METHOD_NAMES = tuple(METHODS)


def bench_variants() -> dict:
    """Every variant bench times -> its table label: the reference first, then the registry's order."""
    order = [REFERENCE] + [name for name in METHODS if name != REFERENCE]
    return {variant: label for name in order for variant, label in METHODS[name].timed_variants().items()}


def parameter_groups(model, settings: Mapping, head: Optional[str]) -> tuple[list, list[str]]:
    """AdamW groups of the trainable parameters and the kind of each group: the update (``lr``), the head
    (``head_lr``), LoCA's locations (``location_lr``, no weight decay)."""
    kind_of = METHODS[settings["method"]].parameter_kind
    members = {"update": [], "head": [], "locations": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            members[kind_of(name, head)].append(param)
    decay = settings["weight_decay"]
    options = {"update": (settings["lr"], decay), "head": (settings["head_lr"], decay),
               "locations": (settings["location_lr"], 0.0)}
    groups, kinds = [], []
    for kind, params in members.items():
        if params:
            lr, weight_decay = options[kind]
            groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
            kinds.append(kind)
    return groups, kinds
