"""``spectral-peft evaluate``: rebuild a finished run's model (base + adapter, or the whole model of a full
fine-tuning) in a fresh process from its output folder, recompute its metrics and compare them with metrics.json."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from spectral_peft_cli.run_folder import METRICS_FILE, RUN_FILE, check_finished_run

from .errors import UsageError, first_line
from .evaluation import evaluate_split
from .models import ModelInfo, load_base_model, load_processor, quiet_libraries, resolve_model
from .tasks import encode_task, load_task


def _read_finished_run(folder: pathlib.Path) -> tuple[dict, dict]:
    """A finished run's run.json and metrics.json."""
    check_finished_run(folder)
    try:
        return json.loads((folder / RUN_FILE).read_text()), json.loads((folder / METRICS_FILE).read_text())
    except (json.JSONDecodeError, OSError) as error:
        raise UsageError(f"cannot read {folder}: {first_line(error)}") from None


def _reload_model(run: dict, folder: pathlib.Path, info: ModelInfo, tokenizer):
    """The trained model as the run saved it: the whole model (full fine-tuning), or base model + adapter."""
    if run["method"] == "full":
        return load_base_model(info.saved_in(folder), run["task_kind"], run["num_labels"], tokenizer,
                               run["label_names"])
    from peft import PeftModel

    base = load_base_model(info, run["task_kind"], run["num_labels"], tokenizer, run["label_names"])
    try:
        return PeftModel.from_pretrained(base, str(folder))
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"cannot load the adapter in {folder}: {first_line(error)}") from None


def run_evaluate(args: argparse.Namespace) -> int:
    """``spectral-peft evaluate``: rebuild base + adapter from the folder, recompute the test metrics and compare
    them with metrics.json. Returns 0 when they match, 1 when not."""
    folder = pathlib.Path(args.adapter).expanduser()
    run, recorded = _read_finished_run(folder)
    quiet_libraries(args.threads)
    task = load_task(run["task"], run["seed"], run["val_fraction"], run["test_fraction"],
                     run["settings"])
    if task.label_names != run["label_names"]:
        raise UsageError(f"the labels of task '{run['task']}' are now {task.label_names}, the run had "
                         f"{run['label_names']}; the data changed")
    info = resolve_model(run["model_arg"])
    tokenizer = load_processor(info, task.kind)
    encoded = encode_task(task, tokenizer, run["max_length"], run["seed"], run["val_fraction"], run["test_fraction"])
    split = args.split
    model = _reload_model(run, folder, info, tokenizer)
    result = evaluate_split(model, encoded[split], run["task_kind"], run.get("eval_batch_size", 32), desc=split)
    if split == "test":
        reference = recorded.get("test", {})
    else:
        reference = (recorded.get("validation") or [{}])[-1]
        if recorded.get("args", {}).get("eval_examples"):
            print("note: the run validated on a subset (--eval-examples); this is the whole validation split",
                  file=sys.stderr)
    print(f"{run['method']} adapter in {folder}, {split} split ({len(encoded[split]['labels'])} examples)")
    if not _print_comparison(result, reference):
        print("the recomputed metrics differ from metrics.json", file=sys.stderr)
        return 1
    return 0


def _print_comparison(result: dict, reference: dict) -> bool:
    """The recomputed metrics next to the recorded ones; whether all match (loss and perplexity to 1e-4)."""
    print(f"{'metric':<12} {'recomputed':>12} {'metrics.json':>13}  match")
    all_match = True
    for key in [k for k in ("accuracy", "macro_f1", "perplexity", "loss") if k in result]:
        mine, theirs = result[key], reference.get(key)
        tolerance = 1e-4 * max(1.0, abs(mine)) if key in ("loss", "perplexity") else 1e-9
        match = theirs is not None and abs(mine - theirs) <= tolerance
        all_match &= match
        shown = f"{theirs:.6f}" if theirs is not None else "-"
        print(f"{key:<12} {mine:>12.6f} {shown:>13}  {'yes' if match else 'NO'}")
    return all_match
