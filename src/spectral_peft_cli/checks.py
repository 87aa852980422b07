"""The checks of each command's input that argparse cannot make (ranges, method names, compare's grid, the files),
run before the library is imported; each problem is collected so that one error lists them all."""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Optional

from .arguments import flag
from .errors import Problems, UsageError
from .inputs import check_fractions, check_model_folder, check_task
from .registry import METHOD_NAMES, family
from .run_folder import check_finished_run, check_output

ANALYSIS_FILE = "analysis.json"  # what an earlier analyze wrote (spectral_peft.tools.analyze_report's JSON_FILE)

_POSITIVE = ("batch_size", "grad_accum", "max_length", "eval_batch_size", "n_frequency", "rank", "prior_batches",
             "eval_examples", "threads")
_NOT_NEGATIVE = ("steps", "eval_every", "save_every", "location_learning_steps", "stop_after",
                 "loca_coefficient_steps", "loca_location_steps")


def _at_least(args: argparse.Namespace, keys, minimum: int, problems: Problems) -> None:
    """Each option of ``keys`` that is given must be ``minimum`` (1: positive, 0: 0 or more) or more."""
    for key in keys:
        value = getattr(args, key, None)
        if value is not None and value < minimum:
            problems.add(f"{flag(key)} must be {'positive' if minimum == 1 else '0 or more'}, got {value}")


def check_training_options(args: argparse.Namespace, problems: Problems) -> None:
    """finetune's (and compare's) numbers and method."""
    _at_least(args, _POSITIVE, 1, problems)
    _at_least(args, _NOT_NEGATIVE, 0, problems)
    if getattr(args, "epochs", None) is not None and not args.epochs > 0:
        problems.add(f"--epochs must be positive, got {args.epochs}")
    for key in ("lr", "head_lr", "location_lr"):
        value = getattr(args, key, None)
        if value is not None and isinstance(value, (int, float)) and not (value >= 0 and math.isfinite(value)):
            problems.add(f"{flag(key)} must be a non-negative number, got {value}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        problems.add(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.weight_decay < 0:
        problems.add(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    method = getattr(args, "method", None)
    if method is not None and method not in METHOD_NAMES:
        problems.add(f"unknown method '{method}'; choose one of {', '.join(METHOD_NAMES)}")
    if method is not None and family(method) == "loca" and \
            args.loca_coefficient_steps + args.loca_location_steps == 0:
        problems.add("--loca-coefficient-steps and --loca-location-steps cannot both be 0")


def _check_output_folder(output: str, problems: Problems) -> pathlib.Path:
    path = pathlib.Path(output).expanduser()
    if path.exists() and not path.is_dir():
        problems.add(f"--output {path} is a file, not a folder")
    return path


# ---------------------------------------------------------------------------------------------------------------
# each command


def check_finetune(args, problems: Problems) -> None:
    check_training_options(args, problems)
    problems.catch(check_fractions, args.val_fraction, args.test_fraction)
    check_task(args.task, args, problems)
    problems.catch(check_model_folder, args.model)
    problems.catch(check_output, pathlib.Path(args.output).expanduser(), args.resume, args.overwrite)


def check_compare(args, problems: Problems) -> None:
    parse_grid(args, problems)
    check_training_options(args, problems)  # its --lr is a grid of rates (parse_grid), not a number
    problems.catch(check_fractions, args.val_fraction, args.test_fraction)
    check_task(args.task, args, problems)
    problems.catch(check_model_folder, args.model)
    _check_output_folder(args.output, problems)


def check_evaluate(args, problems: Problems) -> None:
    problems.catch(check_finished_run, pathlib.Path(args.adapter).expanduser())
    _at_least(args, ("threads",), 1, problems)


def check_analyze(args, problems: Problems) -> None:
    if args.tuned is None and args.adapter is None:
        problems.add("give --tuned (a fully fine-tuned model) or --adapter (a PEFT adapter folder), or both")
    _at_least(args, ("prior_batches", "max_length", "batch_size", "threads"), 1, problems)
    for option, name in (("--base", args.base), ("--tuned", args.tuned)):
        try:
            check_model_folder(name)
        except UsageError as error:
            problems.add(f"{option}: {error}{adapter_hint(name)}")
    if args.adapter is not None:
        folder = pathlib.Path(args.adapter).expanduser()
        if not folder.is_dir():
            problems.add(f"--adapter folder not found: {args.adapter}")
        elif not (folder / "adapter_config.json").is_file():
            problems.add(f"--adapter {args.adapter} has no adapter_config.json; it is not a PEFT adapter folder"
                         + (" (it holds a whole model: pass it as --tuned)" if (folder / "config.json").is_file()
                            else ""))
    if args.target_modules is not None and args.tuned is None:
        problems.add("--target-modules applies to --tuned; an adapter's targets are its own")
    check_task(args.task, args, problems)
    output = _check_output_folder(args.output, problems)
    if output.is_dir() and any(output.iterdir()) and not (output / ANALYSIS_FILE).exists():
        problems.add(f"--output {output} is not empty and holds no earlier analysis; use another folder")


def adapter_hint(name: Optional[str]) -> str:
    """For a model option given a folder that holds a PEFT adapter instead."""
    if name is not None and (pathlib.Path(name).expanduser() / "adapter_config.json").is_file():
        return " (it holds a PEFT adapter: pass it as --adapter)"
    return ""


def check_nothing(args, problems: Problems) -> None:
    """bench: argparse checks its options."""


# ---------------------------------------------------------------------------------------------------------------
# compare's grid


def split_list(values: list, name: str, kind=str) -> list:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (each converted by ``kind``; repeats dropped)."""
    items = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                items.append(kind(part))
            except ValueError:
                raise UsageError(f"--{name}: {part!r} is not {'an integer' if kind is int else 'valid'}") from None
    if not items:
        raise UsageError(f"--{name} is empty")
    return list(dict.fromkeys(items))


def parse_per_method(text: Optional[str], methods: list, name: str) -> dict:
    """``"0.01"`` (every method) or ``"loca=0.01,lora=0.001"`` -> {method: value}; missing methods get defaults."""
    if text is None:
        return {}
    values = {}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for part in parts:
        key, sep, value = part.partition("=")
        try:
            if sep:
                key = key.strip()
                if key not in METHOD_NAMES:
                    raise UsageError(f"--{name}: unknown method '{key}'; choose from {', '.join(METHOD_NAMES)}")
                values[key] = float(value)
            elif len(parts) == 1:
                values = {m: float(part) for m in methods}
            else:
                raise UsageError(f"--{name}: expected a number or METHOD=VALUE pairs, got {text!r}")
        except ValueError:
            raise UsageError(f"--{name}: {part!r} is not a number or METHOD=NUMBER") from None
    return values


def parse_grid(args: argparse.Namespace, problems: Optional[Problems] = None) -> dict:
    """compare's methods, budgets, ranks, seeds and per-method learning rates and scalings, checked (problems go to
    ``problems`` when given, else are raised together)."""
    own = problems if problems is not None else Problems()
    grid = {"methods": own.catch(split_list, args.methods, "methods") or []}
    unknown = [m for m in grid["methods"] if m not in METHOD_NAMES]
    for method in unknown:
        own.add(f"unknown method '{method}'; choose from {', '.join(METHOD_NAMES)}")
    for name in ("budgets", "ranks", "seeds"):
        grid[name] = own.catch(split_list, getattr(args, name), name, int) or []
        if name != "seeds" and any(v <= 0 for v in grid[name]):
            own.add(f"--{name} must be positive integers, got {grid[name]}")
    for key, name in (("lrs", "lr"), ("scalings", "scaling")):
        grid[key] = own.catch(parse_per_method, getattr(args, name), grid["methods"], name) or {}
    if problems is None:
        own.check()
    return grid
