"""``spectral-peft finetune``.

One run: read the task, load the model (offline first), measure the base model on validation and test, put one
method on it (LoCA, S2FT, stock PEFT FourierFT, fast FourierFT, stock PEFT LoRA, full fine-tuning, or an ablation),
train for a number of optimizer steps with AdamW and a linear warm-up / decay, evaluate on validation every
``--eval-every`` steps and at the end, on test at the end, and write the output folder:

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
import contextlib
import pathlib
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

from spectral_peft_cli.arguments import DEFAULT_LOG_EVERY, flag

from . import progress
from .checkpoints import (
    CHECKPOINT,
    METRICS_FILE,
    PLOT_FILE,
    RUN_FILE,
    check_output,
    find_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    remove_outputs,
)
from .data import BatchStream
from .errors import UsageError, first_line
from .evaluation import base_label, describe_metrics, evaluate_split, main_metric
from .files import save_model, weight_bytes, write_json
from .images import first_rows
from .methods import METHODS
from .models import (
    ModelInfo,
    check_compatible,
    default_target_modules,
    head_name,
    load_base_model,
    load_processor,
    quiet_libraries,
    resolve_model,
)
from .settings import first_difference, resolve_settings
from .tasks import (
    CLASSIFICATION,
    LANGUAGE_MODELING,
    SPLITS,
    Task,
    encode_task,
    is_classification,
    load_task,
)
from .training import LoopOptions, Training, log, restore_trainable_state, train


def build_method(settings: dict, base, task_kind: str, prior_batches=None):
    """Put the run's method on ``base``: a PEFT model (or ``base`` itself for full fine-tuning).

    ``prior_batches``: S2FT's training batches for the prior; None builds S2FT without a prior (for a resumed run,
    whose orderings and locations come from the checkpoint).
    """
    method = METHODS[settings["method"]]
    head = head_name(base) if is_classification(task_kind) else None
    targets = settings["target_modules"]
    if targets is None:
        targets = default_target_modules(base, task_kind)
    peft_fields = {
        "target_modules": targets,
        "modules_to_save": [head] if head else None,
        # images: PEFT's plain PeftModel, which passes pixel_values on (its task types are for text)
        "task_type": {CLASSIFICATION: "SEQ_CLS", LANGUAGE_MODELING: "CAUSAL_LM"}.get(task_kind),
    }
    try:
        model = method.build(base, settings, peft_fields, prior_batches)
    except ValueError as error:
        raise UsageError(f"cannot put {method.name} on model '{settings['model'] or 'all-MiniLM-L6-v2'}': "
                         f"{first_line(error)}") from None
    _tidy_modules_to_save(model)
    return model


def _tidy_modules_to_save(model) -> None:
    """PEFT's sequence-classification models add 'classifier' and 'score' to the config's modules_to_save, next to
    the head named there: keep each name once, and only the modules the model has, so adapter_config.json names
    the head alone."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for config in getattr(model, "peft_config", {}).values():
        if getattr(config, "modules_to_save", None):
            config.modules_to_save = [name for name in dict.fromkeys(config.modules_to_save) if name in present]


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
    task = load_task(args.task, args.seed, args.val_fraction, args.test_fraction, args)
    info = resolve_model(args.model)
    check_compatible(info, task)
    tokenizer = load_processor(info, task.kind)
    encoded = encode_task(task, tokenizer, args.max_length, args.seed, args.val_fraction, args.test_fraction)
    settings = resolve_settings(args, task, len(encoded["train"]["labels"]), info)
    if checkpoint is not None:
        _check_same_settings(checkpoint["settings"], settings, output)
    validation = encoded["validation"]
    if args.eval_examples is not None:
        validation = first_rows(validation, args.eval_examples)
    return Job(task, info, tokenizer, encoded, settings, BatchStream(encoded["train"], args.batch_size, args.seed),
               validation)


def _check_same_settings(saved: dict, current: dict, output: pathlib.Path) -> None:
    key = first_difference(saved, current)
    if key is not None:
        raise UsageError(f"{flag(key)} is {current.get(key)!r} but the checkpoint in {output} was made with "
                         f"{saved.get(key)!r}; rerun with the same options, or --overwrite to start again")


def _build_model(job: Job, args: argparse.Namespace, resuming: bool):
    """The base model with the run's method on it (seeded: the head's and the adapter's initialisation); returns it,
    the classification head's name and the base model's metrics (None when resuming or skipped)."""
    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    task, loading = job.task, {}
    base = load_base_model(job.info, task.kind, task.num_labels, job.tokenizer, task.label_names, loading=loading)
    head = head_name(base) if is_classification(task.kind) else None
    # before the method is on it (stock FourierFT starts away from the base); evaluation draws no random numbers
    skip = resuming or getattr(args, "skip_base", False)
    before = None if skip else measure_base(base, job, args, loading["fresh_head"])
    prior = None
    if METHODS[job.settings["method"]].uses_prior and not resuming:
        prior = [job.stream.batch(i) for i in range(job.settings["prior_batches"])]
    return build_method(job.settings, base, task.kind, prior), head, before


def measure_base(base, job: Job, args: argparse.Namespace, fresh_head: bool) -> dict:
    """The base model on validation and test (a classifier with the head the run starts from: a fresh one, unless
    the model came with a head of the task's size)."""
    label = base_label(fresh_head)
    result = {"fresh_head": fresh_head}
    for split, encoded in (("validation", job.validation), ("test", job.encoded["test"])):
        result[split] = evaluate_split(base, encoded, job.task.kind, args.eval_batch_size, desc=f"{label}, {split}")
        log(describe_metrics(f"{label}, {split}", result[split]))
    return result


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
    output = pathlib.Path(args.output).expanduser()
    checkpoint_path = check_output(output, args.resume, args.overwrite)
    if args.resume and (output / METRICS_FILE).exists() and not args.overwrite:
        print(f"{output} is already finished (metrics.json); nothing to resume", file=sys.stderr)
        return 0
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    quiet_libraries(args.threads)
    progress.configure(getattr(args, "log_every", None) or DEFAULT_LOG_EVERY, args.quiet)
    job = prepare_job(args, checkpoint, output)
    model, head, before = _build_model(job, args, resuming=checkpoint is not None)

    # ---- from here on the output folder exists
    if args.overwrite and output.exists():
        remove_outputs(output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    with _removed_if_stopped_early(output, created):
        write_json(output / RUN_FILE, _run_info(job, args))
        if checkpoint is not None:
            restore_trainable_state(model, checkpoint, output)
        training = Training(model, job.settings, head, started, checkpoint)
        if checkpoint is None:
            training.history["base"] = before
        _log_start(job, training)
        total_steps = job.settings["steps"]
        stop = total_steps if args.stop_after is None else min(total_steps, args.stop_after)
        options = LoopOptions(grad_accum=args.grad_accum, eval_every=args.eval_every,
                              eval_batch_size=args.eval_batch_size, save_every=args.save_every)
        train(training, job.stream, job.validation, job.task.kind, stop, output, options)
        if stop < total_steps:
            print(f"stopped after step {stop} of {total_steps}; the checkpoint is in {output / CHECKPOINT}: rerun "
                  "the same command with --resume to continue", file=sys.stderr)
            return 0
        _finish(job, training, args, output, resumed_from=checkpoint["step"] if checkpoint is not None else None)
    return 0


@contextlib.contextmanager
def _removed_if_stopped_early(output: pathlib.Path, created: bool):
    """A run stopped (Ctrl-C, an error) before its first checkpoint leaves nothing to resume: what it wrote is
    removed (everything in the folder is its own: check_output let it start only in a new, empty or overwritten
    folder), and the folder too when it created it, so the same command can start again."""
    try:
        yield
    except BaseException:
        if find_checkpoint(output) is None and not (output / METRICS_FILE).exists():
            remove_outputs(output)
            if created:
                output.rmdir()
        raise


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
    if not history["validation"] or history["validation"][-1]["step"] != settings["steps"]:  # --steps 0
        result = evaluate_split(training.model, job.validation, task.kind, args.eval_batch_size, desc="validation")
        history["validation"].append({"step": settings["steps"], **result})
    test = evaluate_split(training.model, job.encoded["test"], task.kind, args.eval_batch_size, desc="test")
    files = save_model(training.model, output)
    phases = history["phase"] if training.schedule is not None else None
    plot_training(output / PLOT_FILE, history["loss"], history["validation"], main_metric(task.kind),
                  title=f"{settings['method']} on {pathlib.Path(task.name).name}", phases=phases)
    metrics = {
        "finished": True, "method": settings["method"], "model": job.info.path, "task": task.name,
        "task_kind": task.kind, "args": {k: v for k, v in vars(args).items() if k != "func"},
        "settings": settings, **training.counts, "adapter_bytes": weight_bytes(files), "adapter_files": files,
        "steps": settings["steps"], "examples": job.sizes, "loss": history["loss"], "lr": history["lr"],
        "phase": phases, "validation": history["validation"], "test": test, "base": history.get("base"),
        **training.timing(),
        "resumed_from_step": resumed_from, "spectral_peft_version": __version__,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(output / METRICS_FILE, metrics)
    if not args.keep_checkpoint:
        remove_checkpoints(output)
    print(f"{describe_metrics('test', test)}{_gain(task.kind, test, history.get('base'))}; "
          f"{training.counts['trainable_params']:,} trainable parameters, adapter {metrics['adapter_bytes']:,} bytes; "
          f"{metrics['wall_time_s']:.0f} s; written to {output}")


def _gain(kind: str, test: dict, base: Optional[dict]) -> str:
    """`` (base model: 0.2000)``: the test metric before training, for the summary line."""
    if not base:
        return ""
    metric = main_metric(kind)
    return f" ({base_label(base['fresh_head'])}: {metric} {base['test'][metric]:.{3 if metric == 'perplexity' else 4}f})"
