"""``spectral-peft finetune`` and ``spectral-peft evaluate``.

One run: read the task, load the model (offline first), put one method on it (LoCA, S2FT, stock PEFT FourierFT,
fast FourierFT, stock PEFT LoRA, or full fine-tuning), train for a number of optimizer steps with AdamW and a linear
warm-up / decay, evaluate on validation every ``--eval-every`` steps and at the end, on test at the end, and write
the output folder:

- ``run.json``: what ``evaluate`` needs to rebuild the model (written when the run starts);
- the adapter from ``save_pretrained`` (``adapter_config.json``, ``adapter_model.safetensors``; for ``full`` the
  whole model's ``config.json`` and ``model.safetensors``);
- ``training.png``: the loss and validation curves;
- ``metrics.json``, written last: a folder without it is not a finished run.

While training, ``checkpoint/`` holds everything a resumed run needs (trainable state, optimizer, lr schedule,
LoCA schedule, RNG states, step, curves). The data order is a function of (seed, step) only, so a run stopped and
resumed ends with the same adapter, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

from .arguments import flag
from .checkpoints import (
    CHECKPOINT,
    METRICS_FILE,
    PLOT_FILE,
    RUN_FILE,
    check_output,
    load_checkpoint,
    remove_checkpoints,
    remove_outputs,
)
from .data import BatchStream
from .errors import UsageError, first_line
from .evaluation import describe_metrics, evaluate_split, main_metric
from .files import save_model, weight_bytes, write_json
from .methods import METHODS
from .models import (
    ModelInfo,
    check_compatible,
    default_target_modules,
    head_name,
    load_base_model,
    load_tokenizer,
    quiet_libraries,
    resolve_model,
)
from .settings import check_arguments, first_difference, resolve_settings
from .tasks import CLASSIFICATION, SPLITS, Task, encode_task, load_task
from .training import LoopOptions, Training, log, restore_trainable_state, train


def build_method(settings: dict, base, task_kind: str, prior_batches=None):
    """Put the run's method on ``base``: a PEFT model (or ``base`` itself for full fine-tuning).

    ``prior_batches``: S2FT's training batches for the prior; None builds S2FT without a prior (for a resumed run,
    whose orderings and locations come from the checkpoint).
    """
    method = METHODS[settings["method"]]
    head = head_name(base) if task_kind == CLASSIFICATION else None
    targets = settings["target_modules"] if settings["target_modules"] is not None else default_target_modules(base)
    peft_fields = {
        "target_modules": targets,
        "modules_to_save": [head] if head else None,
        "task_type": "SEQ_CLS" if task_kind == CLASSIFICATION else "CAUSAL_LM",
    }
    try:
        return method.build(base, settings, peft_fields, prior_batches)
    except ValueError as error:
        raise UsageError(f"cannot put {method.name} on model '{settings['model'] or 'all-MiniLM-L6-v2'}': "
                         f"{first_line(error)}") from None


@dataclass
class Job:
    """A run's inputs, read and checked before anything is written."""

    task: Task
    info: ModelInfo
    tokenizer: object
    encoded: dict
    settings: dict
    stream: BatchStream
    validation: dict

    @property
    def sizes(self) -> dict:
        return {split: len(self.encoded[split]["labels"]) for split in SPLITS}


def prepare_job(args: argparse.Namespace, checkpoint: Optional[dict], output: pathlib.Path) -> Job:
    """Everything that can fail on bad input: the task, the model, the settings (those of ``checkpoint``)."""
    task = load_task(args.task, args.seed, args.val_fraction, args.test_fraction)
    info = resolve_model(args.model)
    check_compatible(info, task)
    tokenizer = load_tokenizer(info)
    encoded = encode_task(task, tokenizer, args.max_length, args.seed, args.val_fraction, args.test_fraction)
    settings = resolve_settings(args, task, len(encoded["train"]["labels"]), info)
    if checkpoint is not None:
        _check_same_settings(checkpoint["settings"], settings, output)
    validation = encoded["validation"]
    if args.eval_examples is not None:
        validation = {k: v[: args.eval_examples] for k, v in validation.items()}
    return Job(task, info, tokenizer, encoded, settings, BatchStream(encoded["train"], args.batch_size, args.seed),
               validation)


def _check_same_settings(saved: dict, current: dict, output: pathlib.Path) -> None:
    key = first_difference(saved, current)
    if key is not None:
        raise UsageError(f"{flag(key)} is {current.get(key)!r} but the checkpoint in {output} was made with "
                         f"{saved.get(key)!r}; rerun with the same options, or --overwrite to start again")


def _build_model(job: Job, seed: int, resuming: bool):
    """The base model with the run's method on it (seeded: the head's and the adapter's initialisation); returns it
    and the classification head's name."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    task = job.task
    base = load_base_model(job.info, task.kind, task.num_labels, job.tokenizer, task.label_names)
    head = head_name(base) if task.kind == CLASSIFICATION else None
    prior = None
    if METHODS[job.settings["method"]].uses_prior and not resuming:
        prior = [job.stream.batch(i) for i in range(job.settings["prior_batches"])]
    return build_method(job.settings, base, task.kind, prior), head


def _run_info(job: Job, args: argparse.Namespace) -> dict:
    from spectral_peft import __version__

    return {
        "method": job.settings["method"],
        "model": job.info.path,
        "model_arg": job.settings["model"],  # None: the default offline MiniLM (found again where evaluate runs)
        "task": job.task.name,
        "task_kind": job.task.kind,
        "seed": args.seed,
        "max_length": args.max_length,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "num_labels": job.task.num_labels,
        "label_names": job.task.label_names,
        "eval_batch_size": args.eval_batch_size,
        "settings": job.settings,
        "spectral_peft_version": __version__,
    }


def run_finetune(args: argparse.Namespace) -> int:
    """``spectral-peft finetune``: returns the exit code; raises UsageError for bad input."""
    started = time.perf_counter()
    check_arguments(args)
    output = pathlib.Path(args.output).expanduser()
    checkpoint_path = check_output(output, args.resume, args.overwrite)
    if args.resume and (output / METRICS_FILE).exists() and not args.overwrite:
        print(f"{output} is already finished (metrics.json); nothing to resume", file=sys.stderr)
        return 0
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    quiet_libraries(args.threads)
    job = prepare_job(args, checkpoint, output)
    model, head = _build_model(job, args.seed, resuming=checkpoint is not None)

    # ---- from here on the output folder exists
    if args.overwrite and output.exists():
        remove_outputs(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / RUN_FILE, _run_info(job, args))
    if checkpoint is not None:
        restore_trainable_state(model, checkpoint, output)
    training = Training(model, job.settings, head, started, checkpoint)
    _log_start(job, training)
    total_steps = job.settings["steps"]
    stop = total_steps if args.stop_after is None else min(total_steps, args.stop_after)
    options = LoopOptions(grad_accum=args.grad_accum, eval_every=args.eval_every,
                          eval_batch_size=args.eval_batch_size, save_every=args.save_every, quiet=args.quiet)
    train(training, job.stream, job.validation, job.task.kind, stop, output, options)
    if stop < total_steps:
        print(f"stopped after step {stop} of {total_steps}; the checkpoint is in {output / CHECKPOINT}: rerun the "
              "same command with --resume to continue", file=sys.stderr)
        return 0
    _finish(job, training, args, output, resumed_from=checkpoint["step"] if checkpoint is not None else None)
    return 0


def _log_start(job: Job, training: Training) -> None:
    sizes, counts, task = job.sizes, training.counts, job.task
    log(f"{METHODS[job.settings['method']].label} on {job.info.display}, task {task.name} ({sizes['train']} train / "
        f"{sizes['validation']} validation / {sizes['test']} test"
        f"{', ' + str(task.num_labels) + ' labels' if task.num_labels else ''}); trainable parameters "
        f"{counts['trainable_params']:,} of {counts['total_params']:,}; {job.settings['steps']} steps "
        f"({job.settings['steps_per_epoch']} per epoch)"
        + (f"; resuming at step {training.start_step}" if training.start_step else ""))


def _finish(job: Job, training: Training, args: argparse.Namespace, output: pathlib.Path,
            resumed_from: Optional[int]) -> None:
    """Test, save the model and the plot, then metrics.json (last: the run is finished once it exists)."""
    import torch

    from spectral_peft import __version__

    from .plots import plot_training

    settings, history, task = job.settings, training.history, job.task
    test = evaluate_split(training.model, job.encoded["test"], task.kind, args.eval_batch_size)
    log(describe_metrics("test", test))
    files = save_model(training.model, output)
    phases = history["phase"] if training.schedule is not None else None
    plot_training(output / PLOT_FILE, history["loss"], history["validation"], main_metric(task.kind),
                  title=f"{settings['method']} on {pathlib.Path(task.name).name}", phases=phases)
    metrics = {
        "finished": True, "method": settings["method"], "model": job.info.path, "task": task.name,
        "task_kind": task.kind, "args": {k: v for k, v in vars(args).items() if k != "func"},
        "settings": settings, **training.counts, "adapter_bytes": weight_bytes(files), "adapter_files": files,
        "steps": settings["steps"], "examples": job.sizes, "loss": history["loss"], "lr": history["lr"],
        "phase": phases, "validation": history["validation"], "test": test, **training.timing(),
        "resumed_from_step": resumed_from, "spectral_peft_version": __version__,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(output / METRICS_FILE, metrics)
    if not args.keep_checkpoint:
        remove_checkpoints(output)
    print(f"{describe_metrics('test', test)}; {training.counts['trainable_params']:,} trainable parameters, adapter "
          f"{metrics['adapter_bytes']:,} bytes; {metrics['wall_time_s']:.0f} s; written to {output}")


# ---------------------------------------------------------------------------------------------------------------
# evaluate


def _read_finished_run(folder: pathlib.Path) -> tuple[dict, dict]:
    """A finished run's run.json and metrics.json."""
    if not folder.is_dir():
        raise UsageError(f"adapter folder not found: {folder}")
    if not (folder / RUN_FILE).is_file():
        raise UsageError(f"{folder} has no run.json; it was not written by spectral-peft finetune")
    if not (folder / METRICS_FILE).is_file():
        raise UsageError(f"{folder} has no metrics.json: the run did not finish (resume it with finetune --resume)")
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
    task = load_task(run["task"], run["seed"], run["val_fraction"], run["test_fraction"])
    if task.label_names != run["label_names"]:
        raise UsageError(f"the labels of task '{run['task']}' are now {task.label_names}, the run had "
                         f"{run['label_names']}; the data changed")
    info = resolve_model(run["model_arg"])
    tokenizer = load_tokenizer(info)
    encoded = encode_task(task, tokenizer, run["max_length"], run["seed"], run["val_fraction"], run["test_fraction"])
    split = args.split
    model = _reload_model(run, folder, info, tokenizer)
    result = evaluate_split(model, encoded[split], run["task_kind"], run.get("eval_batch_size", 32))
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
