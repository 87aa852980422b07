"""The training loop of a finetune run: AdamW with a linear warm-up and decay, LoCA's schedule, validation every
``eval_every`` steps, an atomic checkpoint every ``save_every`` steps.

:class:`Training` holds everything a checkpoint holds, so that a run stopped anywhere and resumed ends with the same
model, bit for bit, as one never stopped (the data order is the :class:`~spectral_peft.tools.data.BatchStream`'s, a
function of the seed and the step).
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpoints import save_checkpoint, trainable_state
from .data import BatchStream
from .errors import TrainingError, UsageError
from .evaluation import describe_metrics, evaluate_split
from .methods import METHODS, parameter_groups
from .progress import Progress


def log(message: str) -> None:
    """A line of the run's log on stderr, clear of the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def peak_memory_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def count_parameters(model, groups: list, kinds: list) -> dict:
    """The trained parameters, one convention everywhere (tables, plots, metrics.json): weights only, the head
    included (``trainable_params``) and without it (``adapter_params``: coefficients, LoRA factors, or every
    weight); LoCA's float locations are positions, not weights (as its paper counts), and are listed apart
    (``location_params``, 2 per coefficient). Also every parameter of the model (``total_params``)."""
    kind_of = {id(p): kind for group, kind in zip(groups, kinds) for p in group["params"]}
    counts = {"trainable_params": 0, "head_params": 0, "location_params": 0}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        kind = kind_of.get(id(param))
        if kind == "locations":
            counts["location_params"] += param.numel()
            continue
        counts["trainable_params"] += param.numel()
        if kind == "head":
            counts["head_params"] += param.numel()
    counts["adapter_params"] = counts["trainable_params"] - counts["head_params"]
    counts["total_params"] = sum(p.numel() for p in model.parameters())
    return counts


def _warmup_then_decay(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _constant(step: int) -> float:
    return 1.0


def restore_trainable_state(model, checkpoint: dict, where) -> None:
    """Put a checkpoint's trainable parameters and buffers back into ``model`` (refused if they do not fit)."""
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise UsageError(f"the checkpoint in {where} does not fit this model "
                         f"(missing {sorted(trainable & set(missing))[:3]}, unexpected {unexpected[:3]})")


def _schedule(method, model, settings: dict):
    """The method's schedule for the run; what it warns of (a LoCA run whose locations can never move: no location
    step, or a location lr too small to reach another cell) goes to the run's log."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedule = method.schedule(model, settings["steps"])
        if settings.get("location_lr") is not None and hasattr(schedule, "check_location_lr"):
            schedule.check_location_lr(settings["location_lr"])
    for warning in caught:
        log(f"warning: {warning.message}")
    return schedule


class Training:
    """One run's optimizer, lr schedule, LoCA schedule and curves, from scratch or from a ``checkpoint`` (whose
    trainable state :func:`restore_trainable_state` has put into ``model``). ``started``: when the run's process
    started working (``time.perf_counter()``), for its wall time."""

    def __init__(self, model, settings: dict, head: Optional[str], started: float, checkpoint: Optional[dict] = None):
        self.model, self.settings, self.started = model, settings, started
        total = settings["steps"]
        groups, kinds = parameter_groups(model, settings, head)
        self.counts = count_parameters(model, groups, kinds)
        self.optimizer = torch.optim.AdamW(groups)
        warmup = _warmup_then_decay(total, int(settings["warmup_ratio"] * total))
        # locations move in cells per step: no warm-up or decay for them
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [_constant if kind == "locations" else warmup for kind in kinds])
        self.history = {"loss": [], "lr": [], "phase": [], "validation": [], "step_times": [], "elapsed": 0.0,
                        "peak": 0.0}
        self.start_step = 0
        method = METHODS[settings["method"]]
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.start_step, self.history = checkpoint["step"], checkpoint["history"]
        self.schedule = _schedule(method, model, settings) if method.schedule is not None else None
        if checkpoint is not None:
            if self.schedule is not None:
                self.schedule.load_state_dict(checkpoint["loca_schedule"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            random.setstate(checkpoint["rng"]["python"])
        self.elapsed_before = self.history["elapsed"]  # the wall time of the run's earlier processes

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.started)

    def step(self, stream: BatchStream, step: int, grad_accum: int) -> tuple[float, float, Optional[str]]:
        """One optimizer step over ``grad_accum`` batches; returns its loss, learning rate and LoCA phase."""
        phase = self.schedule.phase() if self.schedule is not None else None
        tick = time.perf_counter()
        step_loss = 0.0
        for j in range(grad_accum):
            loss = self.model(**stream.batch(step * grad_accum + j)).loss
            (loss / grad_accum).backward()
            step_loss += loss.item() / grad_accum
        if not math.isfinite(step_loss):
            raise TrainingError(f"the training loss is {step_loss} at step {step + 1}; try a smaller --lr "
                                f"(now {self.settings['lr']:g})")
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            self.schedule.step()
        self.history["step_times"].append(time.perf_counter() - tick)
        self.history["loss"].append(step_loss)
        self.history["lr"].append(lr_now)
        self.history["phase"].append(phase)
        return step_loss, lr_now, phase

    def checkpoint(self, step: int) -> dict:
        """Everything a resumed run needs after ``step`` steps."""
        self.history["elapsed"] = self.elapsed()
        self.history["peak"] = max(self.history["peak"], peak_memory_mib())
        return {
            "version": 1, "step": step, "settings": self.settings, "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "loca_schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "history": self.history,
        }

    def timing(self) -> dict:
        """Wall time, training time, the median and mean time of a step, and the peak memory, for metrics.json."""
        times = self.history["step_times"]
        return {
            "wall_time_s": self.elapsed(),
            "train_time_s": sum(times),
            "time_per_step_s": sorted(times)[len(times) // 2] if times else None,
            "mean_time_per_step_s": sum(times) / len(times) if times else None,
            "peak_memory_mib": max(self.history["peak"], peak_memory_mib()),
        }


@dataclass
class LoopOptions:
    grad_accum: int = 1
    eval_every: int = 50  # 0: validate only at the end
    eval_batch_size: int = 32
    save_every: int = 100  # 0: a checkpoint only where the run stops early


def train(training: Training, stream: BatchStream, validation: dict, task_kind: str, stop: int, output,
          options: LoopOptions) -> None:
    """Steps ``training.start_step`` up to ``stop`` (at most the run's steps), validating and checkpointing into
    ``output`` on the way; a run stopped early leaves a checkpoint at ``stop``."""
    total = training.settings["steps"]
    training.model.train()
    with Progress(total, f"{training.settings['method']} training", initial=training.start_step) as progress:
        for step in range(training.start_step, stop):
            loss, lr, phase = training.step(stream, step, options.grad_accum)
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
            if phase is not None:
                postfix["phase"] = phase
            progress.update(1, **postfix)
            done = step + 1
            if (options.eval_every and done % options.eval_every == 0) or done == total:
                result = evaluate_split(training.model, validation, task_kind, options.eval_batch_size,
                                        desc=f"validation at step {done}")
                training.history["validation"].append({"step": done, **result})
                progress.write(describe_metrics(f"step {done} validation", result))
            if done < total and ((options.save_every and done % options.save_every == 0) or done == stop):
                save_checkpoint(output, training.checkpoint(done))
