"""A run's training options as it uses them: the options checked, defaults filled in, the steps computed. They are
recorded in run.json and metrics.json; a resumed run, and a finished cell of a comparison, must match them."""

from __future__ import annotations

import argparse
import math
from typing import Mapping, Optional

from .arguments import DEFAULT_EPOCHS, flag
from .errors import UsageError
from .methods import METHOD_NAMES, METHODS, N_FREQUENCY, RANK
from .tasks import CLASSIFICATION, Task

# options that change what is trained: a resumed run must be given the same ones
TRAINING_KEYS = (
    "method", "model", "task", "n_frequency", "rank", "scaling", "lr", "head_lr", "location_lr",
    "loca_coefficient_steps", "loca_location_steps", "location_learning_steps", "s2ft_prior", "prior_batches",
    "s2ft_prior_optimizer", "s2ft_transform", "s2ft_ordering", "steps", "batch_size", "grad_accum", "max_length", "seed", "target_modules",
    "warmup_ratio", "weight_decay", "val_fraction", "test_fraction",
)
# every method's own settings: for the other methods they are None
_OWN_SETTINGS = {key for method in METHODS.values() for key in method.own_settings}


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
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        if not targets:
            raise UsageError("--target-modules is empty")
        settings["target_modules"] = targets
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
    if task.kind != CLASSIFICATION:
        settings["head_lr"] = None
    return settings


def check_arguments(args: argparse.Namespace) -> None:
    """finetune's (and compare's) options that argparse cannot check: ranges, the method's name."""
    positive = ["batch_size", "grad_accum", "max_length", "eval_batch_size", "n_frequency", "rank", "prior_batches",
                "loca_coefficient_steps", "loca_location_steps"]
    for key in positive + ["steps", "eval_examples", "threads"]:
        value = getattr(args, key, None)
        if value is not None and value < (0 if key in ("loca_coefficient_steps", "loca_location_steps") else 1):
            raise UsageError(f"{flag(key)} must be positive, got {value}")
    for key in ("eval_every", "save_every", "location_learning_steps", "stop_after"):
        value = getattr(args, key, None)
        if value is not None and value < 0:
            raise UsageError(f"{flag(key)} must be 0 or more, got {value}")
    if getattr(args, "epochs", None) is not None and not args.epochs > 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    for key in ("lr", "head_lr", "location_lr"):
        value = getattr(args, key, None)
        if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise UsageError(f"{flag(key)} must be a non-negative number, got {value}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    if getattr(args, "method", None) is not None and args.method not in METHODS:
        raise UsageError(f"unknown method '{args.method}'; choose one of {', '.join(METHOD_NAMES)}")
    if getattr(args, "method", None) in ("loca", "loca-frozen") and args.loca_coefficient_steps + args.loca_location_steps == 0:
        raise UsageError("--loca-coefficient-steps and --loca-location-steps cannot both be 0")


def first_difference(made: Mapping, wanted: Mapping) -> Optional[str]:
    """The first training option (as TRAINING_KEYS orders them) whose value differs, or None."""
    return next((key for key in TRAINING_KEYS if made.get(key) != wanted.get(key)), None)
