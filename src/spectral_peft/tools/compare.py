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

from spectral_peft_cli.arguments import COMPARE_GRID_OPTIONS, DEFAULT_N_FREQUENCY, DEFAULT_RANK, flag, option_tokens
from spectral_peft_cli.checks import parse_grid
from spectral_peft_cli.commands import CELL_ENV

from .checkpoints import METRICS_FILE
from .errors import TrainingError, UsageError, report_error
from .evaluation import base_label, main_metric
from .files import write_json, write_text
from .methods import METHODS, N_FREQUENCY, RANK
from .settings import first_difference

# a finetune run's own control options, which a cell sets itself
_RUN_CONTROL = ("output", "resume", "overwrite", "stop_after")


def plan_cells(methods: list, budgets: list, ranks: list, seeds: list) -> list[dict]:
    """The grid's cells, seed by seed: each method at each of its budgets (n_frequency, rank, or none)."""
    cells = []
    for seed in seeds:
        for method in methods:
            budget_kind = METHODS[method].budget
            if budget_kind == N_FREQUENCY:
                options = [(f"n{n}", {"n_frequency": n}) for n in budgets]
            elif budget_kind == RANK:
                options = [(f"r{r}", {"rank": r}) for r in ranks]
            else:
                options = [("all", {})]
            for budget, extra in options:
                # the base model is the same in every cell of a seed (split and head): the first cell measures it
                cells.append({"method": method, "budget": budget, "seed": seed, "options": extra,
                              "name": f"{method}-{budget}-seed{seed}",
                              "skip_base": any(c["seed"] == seed for c in cells)})
    return cells


def cell_namespace(args: argparse.Namespace, cell: dict, lrs: dict, scalings: dict, folder: pathlib.Path):
    """The finetune options of a cell: compare's training options, then the cell's method, budget and seed."""
    values = {"method": cell["method"], "n_frequency": DEFAULT_N_FREQUENCY, "rank": DEFAULT_RANK}
    values.update((key, value) for key, value in vars(args).items()
                  if key not in COMPARE_GRID_OPTIONS and key not in ("func", "command"))
    values.update(seed=cell["seed"], lr=lrs.get(cell["method"]), scaling=scalings.get(cell["method"]),
                  output=str(folder), resume=True, overwrite=False, stop_after=None,
                  skip_base=cell.get("skip_base", False))
    values.update(cell["options"])
    return argparse.Namespace(**values)


def cell_argv(namespace: argparse.Namespace) -> list[str]:
    """The finetune command line of a cell's options: every option that is set (a flag alone when true), then
    ``--output`` and ``--resume``."""
    return ["finetune", *option_tokens(vars(namespace), skip=_RUN_CONTROL), "--output", namespace.output, "--resume"]


def _mean_std(values: list) -> tuple:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(cells: list[dict], metric: str) -> list[dict]:
    """One row per (method, budget): the mean and std over the finished seeds."""
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
        for key in ("trainable_params", "adapter_params", "location_params", "adapter_bytes"):
            result[key] = done[0].get(key) if done else None
        _add_test_stats(result, [c["test"] for c in done], metric)
        result["time_per_step_s"] = _mean_std([c["time_per_step_s"] for c in done if c["time_per_step_s"]])[0]
        result["peak_memory_mib"] = _mean_std([c["peak_memory_mib"] for c in done])[0]
        out.append(result)
    return out


def base_row(cells: list[dict], metric: str) -> Optional[dict]:
    """The base model's row (its test metrics before training), mean and std over the seeds: each seed's from the
    first finished cell that measured it; None when none did."""
    by_seed = {}
    for cell in cells:
        if cell["status"] == "finished" and cell.get("base") and cell["seed"] not in by_seed:
            by_seed[cell["seed"]] = cell["base"]
    if not by_seed:
        return None
    row = {"method": base_label(any(base["fresh_head"] for base in by_seed.values())), "budget": "-",
           "seeds": sorted(by_seed), "failed_seeds": [], "trainable_params": None, "adapter_params": None,
           "adapter_bytes": None, "time_per_step_s": None, "peak_memory_mib": None}
    _add_test_stats(row, [base["test"] for base in by_seed.values()], metric)
    return row


def _add_test_stats(row: dict, tests: list[dict], metric: str) -> None:
    """The mean, std and values over ``tests`` of ``metric`` and macro-F1 (where measured), into ``row``."""
    for key in (metric, "macro_f1"):
        values = [test[key] for test in tests if key in test]
        row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(values)
        row[f"{key}_values"] = values


def _fmt(mean, std, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _number(value) -> str:
    return f"{value:,}" if value is not None else "-"


def markdown_table(rows: list[dict], metric: str) -> str:
    classification = metric == "accuracy"
    header = ["method", "budget", "trainable params", "adapter params", "adapter bytes", f"test {metric}"]
    header += ["test macro-F1"] if classification else []
    header += ["s / step", "peak MiB", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        adapter = _number(row["adapter_params"])
        if row.get("location_params"):
            adapter += f" (+{_number(row['location_params'])} locations)"
        cells = [row["method"], row["budget"], _number(row["trainable_params"]), adapter,
                 _number(row["adapter_bytes"]), _fmt(row[f"{metric}_mean"], row[f"{metric}_std"])]
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
    key = first_difference(made, wanted)
    return f"{flag(key)} {made.get(key)!r}, now {wanted.get(key)!r}" if key is not None else ""


def _read_cell(folder: pathlib.Path, cell: dict) -> dict:
    record = {k: cell[k] for k in ("method", "budget", "seed", "name")}
    record["folder"] = str(folder)
    path = folder / METRICS_FILE
    if not path.is_file() or cell.get("status", "finished") != "finished":
        record["status"] = cell.get("status", "missing")
        return record
    metrics = json.loads(path.read_text())
    record.update(status="finished", test=metrics["test"], trainable_params=metrics["trainable_params"],
                  adapter_params=metrics["adapter_params"], location_params=metrics.get("location_params", 0),
                  adapter_bytes=metrics["adapter_bytes"],
                  time_per_step_s=metrics["time_per_step_s"], peak_memory_mib=metrics["peak_memory_mib"],
                  wall_time_s=metrics["wall_time_s"], steps=metrics["steps"], lr=metrics["settings"]["lr"],
                  scaling=metrics["settings"]["scaling"], base=metrics.get("base"))
    return record


def _run_cell(namespace: argparse.Namespace, in_process: bool) -> int:
    """Runs one cell's finetune (resuming it if it was interrupted); returns its exit code."""
    if in_process:
        from .finetune import run_finetune

        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the table
                return run_finetune(namespace)
        except (UsageError, TrainingError) as error:
            return report_error(error)
    argv = [sys.executable, "-m", "spectral_peft_cli", *cell_argv(namespace)]
    print("  " + " ".join(shlex.quote(a) for a in argv[1:]), file=sys.stderr)
    try:  # the cell's stdout goes to stderr: stdout carries only the table
        streams = {"stdout": sys.stderr.fileno()}
    except (AttributeError, OSError, ValueError):  # stderr is not a file (captured): collect and pass on
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    # the cell says nothing of a Ctrl-C (which reaches it too): compare reports it, once
    result = subprocess.run(argv, env={**os.environ, CELL_ENV: "1"}, **streams)
    if result.stdout:
        sys.stderr.write(result.stdout)
    return result.returncode


def _run_cells(cells: list[dict], args: argparse.Namespace, grid: dict, output: pathlib.Path, wanted) -> None:
    """Runs every cell not finished before; sets each cell's status. ``wanted(namespace)``: a cell's settings."""
    for index, cell in enumerate(cells, start=1):
        folder = output / "cells" / cell["name"]
        namespace = cell_namespace(args, cell, grid["lrs"], grid["scalings"], folder)
        if (folder / METRICS_FILE).is_file():
            difference = _stale(folder, wanted(namespace))
            if difference:
                print(f"[{index}/{len(cells)}] {cell['name']}: finished before with other options ({difference}); "
                      "left out of the results: remove the folder to run it again", file=sys.stderr)
                cell["status"] = f"stale ({difference})"
            else:
                print(f"[{index}/{len(cells)}] {cell['name']}: finished before, skipped", file=sys.stderr)
                cell["status"] = "finished"
            continue
        print(f"[{index}/{len(cells)}] {cell['name']}", file=sys.stderr)
        code = _run_cell(namespace, args.in_process)
        cell["status"] = "finished" if code == 0 and (folder / METRICS_FILE).is_file() else f"failed (exit {code})"
        if code == 130:
            raise KeyboardInterrupt


def run_compare(args: argparse.Namespace) -> int:
    from .models import check_compatible, load_processor, quiet_libraries, resolve_model
    from .settings import resolve_settings
    from .tasks import encode_task, load_task

    started = time.perf_counter()
    grid = parse_grid(args)
    methods, seeds = grid["methods"], grid["seeds"]
    output = pathlib.Path(args.output).expanduser()  # the command line checked it (spectral_peft_cli.checks)

    # the task and the model must be usable before any cell starts
    quiet_libraries()
    task = load_task(args.task, seeds[0], args.val_fraction, args.test_fraction, args)
    info = resolve_model(args.model)
    check_compatible(info, task)
    encoded = encode_task(task, load_processor(info, task.kind), args.max_length, seeds[0], args.val_fraction,
                          args.test_fraction)
    n_train = len(encoded["train"]["labels"])
    with_ranks = any(METHODS[m].budget == RANK for m in methods)
    if not with_ranks:
        grid["ranks"] = []

    cells = plan_cells(methods, grid["budgets"], grid["ranks"], seeds)
    (output / "cells").mkdir(parents=True, exist_ok=True)
    print(f"compare: {len(cells)} cells ({', '.join(methods)}; budgets {grid['budgets']}"
          + (f", ranks {grid['ranks']}" if with_ranks else "") + f"; seeds {seeds}) into {output}", file=sys.stderr)
    _run_cells(cells, args, grid, output, lambda namespace: resolve_settings(namespace, task, n_train, info))
    records = [_read_cell(output / "cells" / cell["name"], cell) for cell in cells]
    _write_results(output, args, task, info, records, len(seeds))
    failed = [r for r in records if r["status"] != "finished"]
    print(f"\n{len(records) - len(failed)} of {len(records)} cells finished in {time.perf_counter() - started:.0f} s; "
          f"results in {output}/results.md, results.json, results.png", file=sys.stderr)
    if failed:
        print("failed cells: " + ", ".join(r["name"] for r in failed), file=sys.stderr)
        return 1
    return 0


def _write_results(output: pathlib.Path, args: argparse.Namespace, task, info, records: list, n_seeds: int) -> None:
    """results.json, results.md and results.png; the table on stdout."""
    metric = main_metric(task.kind)
    rows, base = aggregate(records, metric), base_row(records, metric)
    table = markdown_table(([base] if base else []) + rows, metric)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    write_json(output / "results.json", {"metric": metric, "task": task.name, "model": info.path,
                                         "args": settings, "base": base, "rows": rows, "cells": records})
    steps = sorted({r["steps"] for r in records if r.get("steps")})
    command = "spectral-peft compare " + " ".join(
        shlex.quote(a) for a in (sys.argv[2:] if sys.argv[1:2] == ["compare"] else []))
    lrs_used = sorted({(r["method"], r["lr"]) for r in records if r.get("lr") is not None})
    write_text(output / "results.md", (
        f"# Comparison: {task.name} on {info.display}\n\n"
        f"{metric} on the test split ({'mean ± std over seeds' if n_seeds > 1 else 'one seed'}); "
        f"{', '.join(str(s) for s in steps) or '?'} optimizer steps; learning rates "
        + ", ".join(f"{m} {lr:g}" for m, lr in lrs_used) + ".\n"
        + "Trainable params: the trained weights, classification head included; adapter params exclude the head. "
          "LoCA's 2 float locations per coefficient are positions, not weights: not counted in either, shown apart "
          "(+N locations). Adapter bytes: the saved weights file. s / step: median wall time of an optimizer step. "
          "Peak MiB: the cell process's peak resident memory. The base model row: before training (a classifier "
          "with the fresh head its runs start from).\n\n"
        + table + "\n"
        + (f"\nCommand: `{command.strip()}`\n" if command.strip() != "spectral-peft compare" else "")
    ))
    if any(r.get(f"{metric}_mean") is not None for r in rows):
        from .plots import plot_comparison

        plot_comparison(output / "results.png", rows, metric,
                        title=f"{task.name}: test {metric} vs trainable parameters", base=base)
    print(table)
