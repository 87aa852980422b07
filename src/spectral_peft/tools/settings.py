"""A run's training options as it uses them: defaults filled in, the steps computed (the command line checked
them). They are recorded in run.json and metrics.json; a resumed run, and a finished cell of a comparison, must match
them."""

from __future__ import annotations

import argparse
import math
from typing import Mapping, Optional

from spectral_peft_cli.arguments import DEFAULT_EPOCHS

from .errors import UsageError
from .methods import METHODS, N_FREQUENCY, RANK
from .tasks import Task, is_classification

# options that change what is trained: a resumed run must be given the same ones
TRAINING_KEYS = (
    "method", "model", "task", "n_frequency", "rank", "scaling", "lr", "head_lr", "location_lr",
    "loca_coefficient_steps", "loca_location_steps", "location_learning_steps", "s2ft_prior", "prior_batches",
    "s2ft_prior_optimizer", "s2ft_transform", "s2ft_ordering", "steps", "batch_size", "grad_accum", "max_length",
    "seed", "target_modules", "warmup_ratio", "weight_decay", "val_fraction", "test_fraction", "text_column",
    "label_column", "image_column", "encoding",
)
# every method's own settings: for the other methods they are None
_OWN_SETTINGS = {key for method in METHODS.values() for key in method.own_settings}


def target_module_list(value: str) -> list[str]:
    """``--target-modules``' comma list as names (blanks dropped); an error when it names none."""
    targets = [t.strip() for t in value.split(",") if t.strip()]
    if not targets:
        raise UsageError("--target-modules is empty")
    return targets


def resolve_settings(args: argparse.Namespace, task: Task, n_train: int, info=None) -> dict:
    """The options as the run uses them (defaults filled in, steps computed): recorded in run.json and checked on
    resume. ``info``: the resolved model (its path stands for a model given by name)."""
    method = METHODS[args.method]
    settings = {key: getattr(args, key, None) for key in TRAINING_KEYS}
    settings["model"] = info.path if info is not None and info.arg is not None else args.model
    settings["task"] = task.name
    settings["lr"] = args.lr if args.lr is not None else method.lr
    settings["scaling"] = args.scaling if args.scaling is not None else method.scaling
    if isinstance(args.target_modules, str):
        settings["target_modules"] = target_module_list(args.target_modules)
    steps_per_epoch = math.ceil(math.ceil(n_train / args.batch_size) / args.grad_accum)
    if args.steps is not None:
        steps = args.steps
    else:
        epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS
        steps = max(1, math.ceil(epochs * steps_per_epoch))
    settings["steps"] = steps
    settings["steps_per_epoch"] = steps_per_epoch
    # the options that do not apply to this method are not part of its identity
    if method.budget != N_FREQUENCY:
        settings["n_frequency"] = None
    if method.budget != RANK:
        settings["rank"] = None
    for key in _OWN_SETTINGS - set(method.own_settings):
        settings[key] = None
    settings.update(method.presets or {})  # an ablation's fixed settings, whatever the options said
    if method.fill_settings is not None:
        method.fill_settings(settings)
    if not is_classification(task.kind):
        settings["head_lr"] = None
    return settings


def first_difference(made: Mapping, wanted: Mapping) -> Optional[str]:
    """The first training option (as TRAINING_KEYS orders them) whose value differs, or None."""
    return next((key for key in TRAINING_KEYS if made.get(key) != wanted.get(key)), None)
