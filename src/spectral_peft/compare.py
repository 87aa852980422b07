"""``spectral-peft compare``: a grid of methods x budgets x seeds on one model and task.

Each cell is one ``finetune`` run into ``OUTPUT/cells/<method>-<budget>-seed<seed>/`` (budget ``n<N>`` for the
spectral methods, ``r<R>`` for LoRA, ``all`` for full fine-tuning), by default in a fresh Python process so that its
peak memory is its own. A cell that has ``metrics.json`` is skipped; an interrupted one resumes from its checkpoint.
Then ``results.json``, ``results.md`` (mean and std over seeds) and ``results.png`` (test accuracy against
trainable parameters, log x) are written and the table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Optional

from .errors import TrainingError, UsageError
from .finetune import (
    METHODS,
    METRICS_FILE,
    SPECTRAL_METHODS,
    TRAINING_KEYS,
    add_training_arguments,
    check_arguments,
    check_compatible,
    encode_task,
    load_tokenizer,
    main_metric,
    quiet_libraries,
    resolve_model,
    resolve_settings,
    write_json,
)
from .tasks import CLASSIFICATION, load_task

DEFAULT_METHODS = ("loca", "s2ft", "lora", "fourierft")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid")
    grid.add_argument("--methods", nargs="+", default=[",".join(DEFAULT_METHODS)],
                      help="methods, comma or space separated (default " + ",".join(DEFAULT_METHODS) + "; any of "
                           + ", ".join(METHODS) + ")")
    grid.add_argument("--budgets", nargs="+", default=["100,300,1000"],
                      help="n_frequency values for the spectral methods (default 100,300,1000)")
    grid.add_argument("--ranks", nargs="+", default=["1,4,8"], help="LoRA ranks (default 1,4,8)")
    grid.add_argument("--seeds", nargs="+", default=["0"], help="seeds (default 0)")
    grid.add_argument("--output", required=True, help="output folder of the grid")
    grid.add_argument("--in-process", action="store_true",
                      help="run the cells in this process (faster start; peak memory is then this process's)")


def _split_list(values: list, name: str, kind=str) -> list:
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
                if key not in METHODS:
                    raise UsageError(f"--{name}: unknown method '{key}'; choose from {', '.join(METHODS)}")
                values[key] = float(value)
            elif len(parts) == 1:
                values = {m: float(part) for m in methods}
            else:
                raise UsageError(f"--{name}: expected a number or METHOD=VALUE pairs, got {text!r}")
        except ValueError:
            raise UsageError(f"--{name}: {part!r} is not a number or METHOD=NUMBER") from None
    return values


def plan_cells(methods: list, budgets: list, ranks: list, seeds: list) -> list[dict]:
    cells = []
    for seed in seeds:
        for method in methods:
            if method in SPECTRAL_METHODS:
                options = [(f"n{n}", {"n_frequency": n}) for n in budgets]
            elif method == "lora":
                options = [(f"r{r}", {"rank": r}) for r in ranks]
            else:
                options = [("all", {})]
            for budget, extra in options:
                cells.append({"method": method, "budget": budget, "seed": seed, "options": extra,
                              "name": f"{method}-{budget}-seed{seed}"})
    return cells


def _finetune_actions() -> list:
    parser = argparse.ArgumentParser(add_help=False)
    add_training_arguments(parser)
    return [a for a in parser._actions if a.option_strings]


def cell_namespace(args: argparse.Namespace, cell: dict, lrs: dict, scalings: dict, folder: pathlib.Path):
    values = {a.dest: getattr(args, a.dest, a.default) for a in _finetune_actions()}
    values.update(method=cell["method"], seed=cell["seed"], lr=lrs.get(cell["method"]),
                  scaling=scalings.get(cell["method"]), output=str(folder), resume=True, overwrite=False,
                  stop_after=None)
    values.update(cell["options"])
    return argparse.Namespace(**values)


def cell_argv(namespace: argparse.Namespace) -> list[str]:
    argv = ["finetune"]
    for action in _finetune_actions():
        value = getattr(namespace, action.dest, None)
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(action.option_strings[0])
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv + ["--output", namespace.output, "--resume"]


def _mean_std(values: list) -> tuple:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(cells: list[dict], metric: str) -> list[dict]:
    rows = {}
    for cell in cells:
        key = (cell["method"], cell["budget"])
        row = rows.setdefault(key, {"method": cell["method"], "budget": cell["budget"], "cells": []})
        row["cells"].append(cell)
    out = []
    for row in rows.values():
        done = [c for c in row["cells"] if c["status"] == "finished"]
        result = {"method": row["method"], "budget": row["budget"], "seeds": [c["seed"] for c in done],
                  "failed_seeds": [c["seed"] for c in row["cells"] if c["status"] != "finished"]}
        for key in ("trainable_params", "adapter_params", "adapter_bytes"):
            result[key] = done[0][key] if done else None
        for key in (metric, "macro_f1"):
            values = [c["test"][key] for c in done if key in c["test"]]
            result[f"{key}_mean"], result[f"{key}_std"] = _mean_std(values)
            result[f"{key}_values"] = values
        result["time_per_step_s"] = _mean_std([c["time_per_step_s"] for c in done if c["time_per_step_s"]])[0]
        result["peak_memory_mib"] = _mean_std([c["peak_memory_mib"] for c in done])[0]
        out.append(result)
    return out


def _fmt(mean, std, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(rows: list[dict], metric: str) -> str:
    classification = metric == "accuracy"
    header = ["method", "budget", "trainable params", "adapter params", "adapter bytes", f"test {metric}"]
    header += ["test macro-F1"] if classification else []
    header += ["s / step", "peak MiB", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        number = lambda v: f"{v:,}" if v is not None else "-"  # noqa: E731
        cells = [row["method"], row["budget"], number(row["trainable_params"]), number(row["adapter_params"]),
                 number(row["adapter_bytes"]), _fmt(row[f"{metric}_mean"], row[f"{metric}_std"])]
        if classification:
            cells.append(_fmt(row["macro_f1_mean"], row["macro_f1_std"]))
        seeds = ",".join(str(s) for s in row["seeds"]) or "-"
        if row["failed_seeds"]:
            seeds += " (failed: " + ",".join(str(s) for s in row["failed_seeds"]) + ")"
        cells += [f"{row['time_per_step_s']:.3f}" if row["time_per_step_s"] else "-",
                  f"{row['peak_memory_mib']:.0f}" if row["peak_memory_mib"] else "-", seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stale(folder: pathlib.Path, wanted: dict) -> str:
    """'' when the finished cell was made with the training options asked for now, else the first difference."""
    try:
        made = json.loads((folder / METRICS_FILE).read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return "unreadable metrics.json"
    for key in TRAINING_KEYS:
        if made.get(key) != wanted.get(key):
            return f"--{key.replace('_', '-')} {made.get(key)!r}, now {wanted.get(key)!r}"
    return ""


def _read_cell(folder: pathlib.Path, cell: dict) -> dict:
    record = {k: cell[k] for k in ("method", "budget", "seed", "name")}
    record["folder"] = str(folder)
    path = folder / METRICS_FILE
    if not path.is_file() or cell.get("status", "finished") != "finished":
        record["status"] = cell.get("status", "missing")
        return record
    metrics = json.loads(path.read_text())
    record.update(status="finished", test=metrics["test"], trainable_params=metrics["trainable_params"],
                  adapter_params=metrics["adapter_params"], adapter_bytes=metrics["adapter_bytes"],
                  time_per_step_s=metrics["time_per_step_s"], peak_memory_mib=metrics["peak_memory_mib"],
                  wall_time_s=metrics["wall_time_s"], steps=metrics["steps"], lr=metrics["settings"]["lr"],
                  scaling=metrics["settings"]["scaling"])
    return record


def run_compare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    methods = _split_list(args.methods, "methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method '{unknown[0]}'; choose from {', '.join(METHODS)}")
    budgets = _split_list(args.budgets, "budgets", int)
    ranks = _split_list(args.ranks, "ranks", int)
    seeds = _split_list(args.seeds, "seeds", int)
    for name, values in (("budgets", budgets), ("ranks", ranks)):
        if any(v <= 0 for v in values):
            raise UsageError(f"--{name} must be positive integers, got {values}")
    lrs = parse_per_method(args.lr, methods, "lr")
    scalings = parse_per_method(args.scaling, methods, "scaling")
    check_arguments(argparse.Namespace(**{**vars(args), "lr": None, "method": None}))
    output = pathlib.Path(args.output).expanduser()
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")

    # the task and the model must be usable before any cell starts
    quiet_libraries()
    task = load_task(args.task, seeds[0], args.val_fraction, args.test_fraction)
    info = resolve_model(args.model)
    check_compatible(info, task)
    encoded = encode_task(task, load_tokenizer(info), args.max_length, seeds[0], args.val_fraction,
                          args.test_fraction)
    n_train = len(encoded["train"]["labels"])
    if "lora" not in methods:
        ranks = []
    metric = main_metric(task.kind)

    cells = plan_cells(methods, budgets, ranks, seeds)
    (output / "cells").mkdir(parents=True, exist_ok=True)
    print(f"compare: {len(cells)} cells ({', '.join(methods)}; budgets {budgets}"
          + (f", ranks {ranks}" if "lora" in methods else "") + f"; seeds {seeds}) into {output}", file=sys.stderr)
    for index, cell in enumerate(cells, start=1):
        folder = output / "cells" / cell["name"]
        namespace = cell_namespace(args, cell, lrs, scalings, folder)
        if (folder / METRICS_FILE).is_file():
            difference = _stale(folder, resolve_settings(namespace, task, n_train, info))
            if difference:
                print(f"[{index}/{len(cells)}] {cell['name']}: finished before with other options ({difference}); "
                      "left out of the results: remove the folder to run it again", file=sys.stderr)
                cell["status"] = f"stale ({difference})"
            else:
                print(f"[{index}/{len(cells)}] {cell['name']}: finished before, skipped", file=sys.stderr)
                cell["status"] = "finished"
            continue
        print(f"[{index}/{len(cells)}] {cell['name']}", file=sys.stderr)
        if args.in_process:
            from .finetune import run_finetune

            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the table
                    code = run_finetune(namespace)
            except (UsageError, TrainingError) as error:
                print(f"spectral-peft: error: {error}", file=sys.stderr)
                code = 2 if isinstance(error, UsageError) else 1
        else:
            argv = [sys.executable, "-m", "spectral_peft", *cell_argv(namespace)]
            print("  " + " ".join(shlex.quote(a) for a in argv[1:]), file=sys.stderr)
            try:  # the cell's stdout goes to stderr: stdout carries only the table
                streams = {"stdout": sys.stderr.fileno()}
            except (AttributeError, OSError, ValueError):  # stderr is not a file (captured): collect and pass on
                streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
            result = subprocess.run(argv, env=os.environ.copy(), **streams)
            if result.stdout:
                sys.stderr.write(result.stdout)
            code = result.returncode
        cell["status"] = "finished" if code == 0 and (folder / METRICS_FILE).is_file() else f"failed (exit {code})"
        if code == 130:
            raise KeyboardInterrupt

    records = [_read_cell(output / "cells" / cell["name"], cell) for cell in cells]
    rows = aggregate(records, metric)
    table = markdown_table(rows, metric)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    write_json(output / "results.json", {"metric": metric, "task": task.name, "model": info.path,
                                         "args": settings, "rows": rows, "cells": records})
    steps = sorted({r["steps"] for r in records if r.get("steps")})
    command = "spectral-peft compare " + " ".join(
        shlex.quote(a) for a in (sys.argv[2:] if sys.argv[1:2] == ["compare"] else []))
    lrs_used = sorted({(r["method"], r["lr"]) for r in records if r.get("lr") is not None})
    text = (
        f"# Comparison: {task.name} on {info.display}\n\n"
        f"{metric} on the test split ({'mean ± std over seeds' if len(seeds) > 1 else 'one seed'}); "
        f"{', '.join(str(s) for s in steps) or '?'} optimizer steps; learning rates "
        + ", ".join(f"{m} {lr:g}" for m, lr in lrs_used) + ".\n"
        + "Trainable params include the classification head; adapter params exclude it (LoCA's count includes its "
          "2 float locations per coefficient). Adapter bytes: the saved weights file. s / step: median wall time "
          "of an optimizer step. Peak MiB: the cell process's peak resident memory.\n\n"
        + table + "\n"
        + (f"\nCommand: `{command.strip()}`\n" if command.strip() != "spectral-peft compare" else "")
    )
    tmp = output / "results.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, output / "results.md")
    if any(r.get(f"{metric}_mean") is not None for r in rows):
        from .plots import plot_comparison

        plot_comparison(output / "results.png", rows, metric,
                        title=f"{task.name}: test {metric} vs trainable parameters")
    print(table)
    failed = [r for r in records if r["status"] != "finished"]
    print(f"\n{len(records) - len(failed)} of {len(records)} cells finished in {time.perf_counter() - started:.0f} s; "
          f"results in {output}/results.md, results.json, results.png", file=sys.stderr)
    if failed:
        print("failed cells: " + ", ".join(r["name"] for r in failed), file=sys.stderr)
        return 1
    return 0
