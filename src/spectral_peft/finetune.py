"""The training job behind ``spectral-peft finetune``, and ``spectral-peft evaluate``.

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
import math
import os
import pathlib
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

from .errors import TrainingError, UsageError
from .tasks import CLASSIFICATION, LANGUAGE_MODELING, SPLITS, Task, encode_task, load_task, looks_like_path

METHODS = ("loca", "s2ft", "fourierft", "fastfourierft", "lora", "full")
SPECTRAL_METHODS = ("loca", "s2ft", "fourierft", "fastfourierft")
# learning rates of the trained update (coefficients, LoRA matrices, or every weight for `full`), from a short check
# on MiniLM + BBC News; docs/results.md tunes x1/3, x1, x3 of these on validation (benchmarks/results_grid.py). With
# the orthonormal DCT one coefficient's atom has unit Frobenius norm, so LoCA / S2FT at scaling 1 need about 1e-2.
DEFAULT_LR = {"loca": 1e-2, "s2ft": 1e-2, "fourierft": 5e-2, "fastfourierft": 5e-2, "lora": 1e-3, "full": 5e-5}
# the method's own default scaling (LoRA: PEFT's lora_alpha=8 whatever the rank; None here means that)
DEFAULT_SCALING = {"loca": 1.0, "s2ft": 1.0, "fourierft": 150.0, "fastfourierft": 150.0, "lora": None, "full": None}
DEFAULT_HEAD_LR = 5e-3
DEFAULT_LOCATION_LR = 0.1
DEFAULT_EPOCHS = 3.0
LORA_DEFAULT_ALPHA = 8
# model types that are decoders even when their config does not say so
DECODER_MODEL_TYPES = {
    "gpt2", "gptj", "gpt_neo", "gpt_neox", "gpt_bigcode", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "opt", "bloom", "falcon", "mpt", "olmo",
    "olmo2", "starcoder2", "codegen", "stablelm", "smollm3", "granite", "cohere", "ctrl", "xglm", "biogpt",
}
HEAD_NAMES = ("classifier", "score")
# options that change what is trained: a resumed run must be given the same ones
TRAINING_KEYS = (
    "method", "model", "task", "n_frequency", "rank", "scaling", "lr", "head_lr", "location_lr",
    "loca_coefficient_steps", "loca_location_steps", "location_learning_steps", "s2ft_prior", "prior_batches",
    "s2ft_prior_optimizer", "s2ft_transform", "steps", "batch_size", "grad_accum", "max_length", "seed", "target_modules",
    "warmup_ratio", "weight_decay", "val_fraction", "test_fraction",
)
CHECKPOINT = "checkpoint"
RUN_FILE, METRICS_FILE, PLOT_FILE = "run.json", "metrics.json", "training.png"
CHECKPOINT_STATE = "state.pt"


# ---------------------------------------------------------------------------------------------------------------
# arguments


def add_training_arguments(parser: argparse.ArgumentParser, grid: bool = False) -> None:
    """The options shared by ``finetune`` and ``compare`` (``grid``: compare's variant, without the method and
    budget options, and with per-method ``--lr`` / ``--scaling``)."""
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", default=None,
                      help="local Hugging Face model folder or hub id (loaded offline first); default: the offline "
                           "all-MiniLM-L6-v2")
    what.add_argument("--task", default="bbc-news",
                      help="'bbc-news' (default), a .csv / .jsonl with text and label columns (classification), a "
                           ".txt (language modelling: perplexity) or a datasets hub name")
    what.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    what.add_argument("--val-fraction", type=float, default=0.1, help="validation share of each label (default 0.1)")
    what.add_argument("--test-fraction", type=float, default=0.2, help="test share of each label (default 0.2)")
    what.add_argument("--target-modules", default=None,
                      help="comma list of module names to adapt; default query,value on BERT-like models, "
                           "otherwise PEFT's default for the architecture")

    method = parser.add_argument_group("method")
    if not grid:
        method.add_argument("--method", required=True, metavar="METHOD",
                            help="one of " + ", ".join(METHODS) + " (fourierft and lora are stock PEFT)")
        method.add_argument("--n-frequency", type=int, default=1000,
                            help="spectral coefficients per adapted matrix (default 1000)")
        method.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    per = "; METHOD=VALUE,... sets it per method" if grid else ""
    method.add_argument("--scaling", default=None, type=str if grid else float,
                        help="multiplier of the weight change; default the method's own (LoCA / S2FT 1, FourierFT "
                             "150, LoRA lora_alpha=8 whatever the rank; for LoRA --scaling s sets lora_alpha = s * "
                             "rank)" + per)
    method.add_argument("--lr", default=None, type=str if grid else float,
                        help="learning rate of the adapter (or of every weight for full); default per method: "
                             + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + per)
    method.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                        help=f"learning rate of the classification head (default {DEFAULT_HEAD_LR:g})")
    method.add_argument("--location-lr", type=float, default=DEFAULT_LOCATION_LR,
                        help=f"LoCA: learning rate of locations, in cells per step (default {DEFAULT_LOCATION_LR:g})")
    method.add_argument("--loca-coefficient-steps", type=int, default=10,
                        help="LoCA: coefficient-only steps per cycle, B_a (default 10)")
    method.add_argument("--loca-location-steps", type=int, default=20,
                        help="LoCA: location-only steps per cycle, B_l (default 20)")
    method.add_argument("--location-learning-steps", type=int, default=None,
                        help="LoCA: steps during which locations may move, B_s (default 10%% of the steps)")
    method.add_argument("--s2ft-prior", choices=("gradient", "lora"), default=None,
                        help="S2FT: prior weight change (default S2FTConfig's: lora, a short LoRA warm-up; gradient "
                             "is cheaper)")
    method.add_argument("--s2ft-prior-optimizer", choices=("sgd", "adam"), default=None,
                        help="S2FT: optimizer of the LoRA warm-up prior (default S2FTConfig's: sgd, whose prior follows "
                             "the gradient; adam ordered a real MiniLM change better, docs/s2ft.md)")
    method.add_argument("--prior-batches", type=int, default=8,
                        help="S2FT: training batches for the prior (default 8)")
    method.add_argument("--s2ft-transform", choices=("dct", "dft"), default="dct", help="S2FT: transform (default dct)")

    train = parser.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None,
                        help=f"passes over the training split (default {DEFAULT_EPOCHS:g} when --steps is not given)")
    train.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default 16)")
    train.add_argument("--grad-accum", type=int, default=1,
                       help="forward passes per optimizer step (default 1)")
    train.add_argument("--warmup-ratio", type=float, default=0.1,
                       help="share of the steps with a linear lr warm-up, then linear decay to 0 (default 0.1)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and data order")
    train.add_argument("--eval-every", type=int, default=50,
                       help="validate every this many steps (0: only at the end; default 50)")
    train.add_argument("--eval-examples", type=int, default=None,
                       help="validate on the first this many validation examples (default all); test is always whole")
    train.add_argument("--eval-batch-size", type=int, default=32, help="examples per evaluation batch (default 32)")
    train.add_argument("--save-every", type=int, default=100,
                       help="write a checkpoint every this many steps (0: never; default 100)")
    train.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint/ when the run finishes")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------------------------
# models


@dataclass
class ModelInfo:
    arg: Optional[str]  # what the user gave (None: the default offline MiniLM)
    path: str  # folder or hub id for from_pretrained
    config: object
    decoder: bool
    local_only: bool  # whether from_pretrained should stay offline

    @property
    def display(self) -> str:
        return self.arg if self.arg is not None else f"all-MiniLM-L6-v2 (offline, {self.path})"


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _from_pretrained(loader, info_path: str, local_only: bool, **kwargs):
    """Offline first: the local folder or cache; the hub only where it is allowed and the cache has nothing."""
    try:
        return loader(info_path, local_files_only=True, **kwargs), True
    except (OSError, ValueError):
        if local_only or _offline():
            raise
    return loader(info_path, **kwargs), False


def resolve_model(name: Optional[str]) -> ModelInfo:
    """Find a model's config (no weights loaded): the default MiniLM, a local folder, or a hub id."""
    from transformers import AutoConfig

    if name is None:
        from .data import default_model_path

        try:
            path = default_model_path()
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        local = True
    else:
        candidate = pathlib.Path(name).expanduser()
        if candidate.exists():
            if not candidate.is_dir():
                raise UsageError(f"model '{name}' is a file; expected a Hugging Face model folder or a hub id")
            if not (candidate / "config.json").is_file():
                raise UsageError(f"model folder '{name}' has no config.json; it is not a Hugging Face model folder")
            path, local = str(candidate.resolve()), True
        elif looks_like_path(name) or name.count("/") > 1:
            raise UsageError(f"model folder not found: {name}")
        else:
            path, local = name, False
    try:
        config, found_locally = _from_pretrained(AutoConfig.from_pretrained, path, local)
    except (OSError, ValueError, KeyError) as error:
        if local:
            raise UsageError(f"could not read the model config in '{path}': {_first_line(error)}") from None
        if _offline():
            raise UsageError(
                f"unknown model '{name}': not a local folder and not in the Hugging Face cache (offline: "
                "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)"
            ) from None
        raise UsageError(f"could not load model '{name}': {_first_line(error)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"model '{name or path}' is an encoder-decoder ({config.model_type}); only encoder models "
                         "(sequence classification) and decoder models (language modelling) are supported")
    architectures = getattr(config, "architectures", None) or []
    decoder = bool(
        getattr(config, "is_decoder", False)
        or any(a.endswith(("CausalLM", "LMHeadModel")) for a in architectures)
        or config.model_type in DECODER_MODEL_TYPES
    )
    return ModelInfo(arg=name, path=path, config=config, decoder=decoder, local_only=local or found_locally)


def load_tokenizer(info: ModelInfo):
    from transformers import AutoTokenizer

    try:
        tokenizer, _ = _from_pretrained(AutoTokenizer.from_pretrained, info.path, info.local_only)
    except Exception as error:  # noqa: BLE001  (tokenizer loading raises many kinds; all mean "unusable model")
        raise UsageError(f"could not load the tokenizer of model '{info.arg or info.path}': {_first_line(error)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer of model '{info.arg or info.path}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(info: ModelInfo, task_kind: str, num_labels: Optional[int], tokenizer, label_names=None,
                    fresh_head: bool = False):
    """The transformers model for the task: sequence classification, or causal LM for a text corpus.
    ``fresh_head``: a saved classification head of another size is replaced by a new one instead of refused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {}
    if task_kind == CLASSIFICATION:
        loader = AutoModelForSequenceClassification.from_pretrained
        kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": fresh_head}
        if label_names is not None:
            kwargs["id2label"] = dict(enumerate(label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    else:
        loader = AutoModelForCausalLM.from_pretrained
    try:
        model, _ = _from_pretrained(loader, info.path, info.local_only, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"could not load model '{info.arg or info.path}': {_first_line(error)}") from None
    model = model.float()
    if task_kind == CLASSIFICATION and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def check_compatible(info: ModelInfo, task: Task) -> None:
    if task.kind == LANGUAGE_MODELING and not info.decoder:
        raise UsageError(
            f"task '{task.name}' is language modelling (a text file) but model '{info.arg or info.path}' is an "
            f"encoder ({info.config.model_type}); use a decoder model such as GPT-2 or Llama"
        )


def head_name(model) -> Optional[str]:
    """The classification head's module name ('classifier' for BERT-likes, 'score' for decoders), if any."""
    names = {name for name, _ in model.named_children()}
    return next((h for h in HEAD_NAMES if h in names), None)


def default_target_modules(model) -> Optional[list]:
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if {"query", "value"} <= leaves:
        return ["query", "value"]
    return None  # PEFT's default for the architecture


# ---------------------------------------------------------------------------------------------------------------
# methods


def resolve_settings(args: argparse.Namespace, task: Task, n_train: int, info: Optional[ModelInfo] = None) -> dict:
    """The options as the run uses them (defaults filled in, steps computed): recorded in run.json and checked on
    resume."""
    method = args.method
    settings = {key: getattr(args, key, None) for key in TRAINING_KEYS}
    settings["model"] = info.path if info is not None and info.arg is not None else args.model
    settings["task"] = task.name
    settings["lr"] = args.lr if args.lr is not None else DEFAULT_LR[method]
    settings["scaling"] = args.scaling if args.scaling is not None else DEFAULT_SCALING[method]
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
    if method not in SPECTRAL_METHODS:
        settings["n_frequency"] = None
    if method != "lora":
        settings["rank"] = None
    if method != "loca":
        for key in ("location_lr", "loca_coefficient_steps", "loca_location_steps", "location_learning_steps"):
            settings[key] = None
    if method != "s2ft":
        for key in ("s2ft_prior", "prior_batches", "s2ft_prior_optimizer", "s2ft_transform"):
            settings[key] = None
    else:
        from .s2ft.config import S2FTConfig

        for key, field in (("s2ft_prior", "prior"), ("s2ft_prior_optimizer", "prior_optimizer")):
            if settings.get(key) is None:
                settings[key] = S2FTConfig.__dataclass_fields__[field].default
    if task.kind != CLASSIFICATION:
        settings["head_lr"] = None
    return settings


def check_arguments(args: argparse.Namespace) -> None:
    positive = ["batch_size", "grad_accum", "max_length", "eval_batch_size", "n_frequency", "rank", "prior_batches",
                "loca_coefficient_steps", "loca_location_steps"]
    for key in positive + ["steps", "eval_examples", "threads"]:
        value = getattr(args, key, None)
        if value is not None and value < (0 if key in ("loca_coefficient_steps", "loca_location_steps") else 1):
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {value}")
    for key in ("eval_every", "save_every", "location_learning_steps", "stop_after"):
        value = getattr(args, key, None)
        if value is not None and value < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be 0 or more, got {value}")
    if getattr(args, "epochs", None) is not None and not args.epochs > 0:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    for key in ("lr", "head_lr", "location_lr"):
        value = getattr(args, key, None)
        if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise UsageError(f"--{key.replace('_', '-')} must be a non-negative number, got {value}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise UsageError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be 0 or more, got {args.weight_decay}")
    if getattr(args, "method", None) is not None and args.method not in METHODS:
        raise UsageError(f"unknown method '{args.method}'; choose one of {', '.join(METHODS)}")
    if getattr(args, "method", None) == "loca" and args.loca_coefficient_steps + args.loca_location_steps == 0:
        raise UsageError("--loca-coefficient-steps and --loca-location-steps cannot both be 0")


def build_method(settings: dict, base, task: Task, prior_batches=None):
    """Put the method on ``base``: a PEFT model (or ``base`` itself for full fine-tuning).

    ``prior_batches``: S2FT's training batches for the prior; None builds S2FT without a prior (for a resumed run,
    whose orderings and locations come from the checkpoint).
    """
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    from . import FastFourierFTConfig, LocaConfig, S2FTConfig, prepare_s2ft

    method = settings["method"]
    if method == "full":
        for param in base.parameters():
            param.requires_grad_(True)
        return base
    head = head_name(base) if task.kind == CLASSIFICATION else None
    targets = settings["target_modules"] if settings["target_modules"] is not None else default_target_modules(base)
    common = {
        "target_modules": targets,
        "modules_to_save": [head] if head else None,
        "task_type": "SEQ_CLS" if task.kind == CLASSIFICATION else "CAUSAL_LM",
    }
    n, scaling = settings["n_frequency"], settings["scaling"]
    try:
        if method == "lora":
            alpha = LORA_DEFAULT_ALPHA if scaling is None else scaling * settings["rank"]
            return get_peft_model(base, LoraConfig(r=settings["rank"], lora_alpha=alpha, **common))
        if method == "fourierft":
            return get_peft_model(base, FourierFTConfig(n_frequency=n, scaling=scaling, **common))
        if method == "fastfourierft":
            return get_peft_model(base, FastFourierFTConfig(n_frequency=n, scaling=scaling, **common))
        if method == "loca":
            config = LocaConfig(
                n_frequency=n, scaling=scaling, coefficient_steps=settings["loca_coefficient_steps"],
                location_steps=settings["loca_location_steps"],
                location_learning_steps=settings["location_learning_steps"], location_seed=settings["seed"],
                **common,
            )
            return get_peft_model(base, config)
        if method == "s2ft":
            # a run.json from before --s2ft-prior-optimizer existed has no such key: S2FTConfig's default then
            optimizer = settings.get("s2ft_prior_optimizer")
            config = S2FTConfig(
                n_frequency=n, scaling=scaling, prior=settings["s2ft_prior"], prior_batches=settings["prior_batches"],
                transform=settings["s2ft_transform"], **({"prior_optimizer": optimizer} if optimizer else {}), **common,
            )
            if prior_batches is None:
                return get_peft_model(base, config)
            return prepare_s2ft(base, config, prior_batches)
    except ValueError as error:
        raise UsageError(f"cannot put {method} on model '{settings['model'] or 'all-MiniLM-L6-v2'}': "
                         f"{_first_line(error)}") from None
    raise UsageError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")


def parameter_groups(model, settings: dict, head: Optional[str]) -> tuple[list, list[str]]:
    """AdamW groups: the update, the head (``--head-lr``), LoCA locations (``--location-lr``, no decay)."""
    update, head_params, locations = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "loca_locations" in name:
            locations.append(param)
        elif head is not None and ("modules_to_save" in name or
                                   (settings["method"] == "full" and name.split(".")[0] == head)):
            head_params.append(param)
        else:
            update.append(param)
    groups, kinds = [], []
    decay = settings["weight_decay"]
    if update:
        groups.append({"params": update, "lr": settings["lr"], "weight_decay": decay})
        kinds.append("update")
    if head_params:
        groups.append({"params": head_params, "lr": settings["head_lr"], "weight_decay": decay})
        kinds.append("head")
    if locations:
        groups.append({"params": locations, "lr": settings["location_lr"], "weight_decay": 0.0})
        kinds.append("locations")
    return groups, kinds


def count_parameters(model, kinds_of: dict) -> dict:
    counts = {"trainable_params": 0, "head_params": 0, "location_params": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        counts["trainable_params"] += param.numel()
        kind = kinds_of.get(id(param))
        if kind == "head":
            counts["head_params"] += param.numel()
        elif kind == "locations":
            counts["location_params"] += param.numel()
    counts["adapter_params"] = counts["trainable_params"] - counts["head_params"]
    counts["total_params"] = sum(p.numel() for p in model.parameters())
    return counts


# ---------------------------------------------------------------------------------------------------------------
# data order and evaluation


class BatchStream:
    """Micro-batch ``k`` of the run: epoch ``k // per_epoch`` is a permutation fixed by (seed, epoch), so any
    micro-batch is a function of (seed, k) and a resumed run sees exactly the batches an uninterrupted one sees."""

    def __init__(self, encoded: dict, batch_size: int, seed: int):
        self.encoded = encoded
        self.size = len(encoded["labels"])
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = math.ceil(self.size / batch_size)
        self._epoch, self._order = None, None

    def order(self, epoch: int):
        import torch

        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        return self._order

    def batch(self, k: int) -> dict:
        epoch, position = divmod(k, self.per_epoch)
        index = self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return {key: value[index] for key, value in self.encoded.items()}


def macro_f1(predictions: list[int], labels: list[int]) -> float:
    """Mean F1 over the classes present in the labels or the predictions (as scikit-learn's 'macro' average)."""
    classes = sorted(set(labels) | set(predictions))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def evaluate_split(model, encoded: dict, kind: str, batch_size: int) -> dict:
    """Accuracy, macro-F1 and mean loss (classification), or perplexity and mean token loss (language modelling)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    size = len(encoded["labels"])
    predictions, labels = [], []
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, size, batch_size):
            batch = {k: v[start:start + batch_size] for k, v in encoded.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if kind == CLASSIFICATION:
                loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                predictions += logits.argmax(-1).tolist()
                labels += batch["labels"].tolist()
            else:
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = batch["labels"][:, 1:].reshape(-1)
                mask = batch["attention_mask"][:, 1:].reshape(-1).bool()
                loss_sum += F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum").item()
                tokens += int(mask.sum())
    model.train(was_training)
    if kind == CLASSIFICATION:
        correct = sum(int(p == y) for p, y in zip(predictions, labels))
        return {"accuracy": correct / size, "macro_f1": macro_f1(predictions, labels), "loss": loss_sum / size,
                "examples": size}
    mean = loss_sum / max(tokens, 1)
    return {"perplexity": math.exp(min(mean, 700.0)), "loss": mean, "tokens": tokens}


def main_metric(kind: str) -> str:
    return "accuracy" if kind == CLASSIFICATION else "perplexity"


# ---------------------------------------------------------------------------------------------------------------
# files


def write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_model(model, output: pathlib.Path) -> dict:
    """``save_pretrained`` into a temporary folder, then each file moved into ``output``; returns file sizes."""
    tmp = output / ".save.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    sizes = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file():
            sizes[path.name] = path.stat().st_size
            os.replace(path, output / path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return sizes


def weight_bytes(sizes: dict) -> int:
    return sum(size for name, size in sizes.items() if name.endswith((".safetensors", ".bin")))


def peak_memory_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _trainable_state(model) -> dict:
    """What changes in training: every trainable parameter and every buffer (LoCA cells' source, S2FT orders)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def save_checkpoint(output: pathlib.Path, state: dict) -> None:
    """Atomically: written to checkpoint.tmp/, then swapped in for checkpoint/ (checkpoint.old/ in between)."""
    import torch

    tmp, final, old = output / (CHECKPOINT + ".tmp"), output / CHECKPOINT, output / (CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / CHECKPOINT_STATE)
    write_json(tmp / "checkpoint.json", {"step": state["step"], "total_steps": state["settings"]["steps"]})
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output: pathlib.Path) -> Optional[pathlib.Path]:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):  # .old: a crash between the two renames
        path = output / name / CHECKPOINT_STATE
        if path.is_file():
            return path
    return None


def load_checkpoint(path: pathlib.Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"cannot read the checkpoint {path}: {_first_line(error)}") from None


def _remove_outputs(output: pathlib.Path) -> None:
    """--overwrite: metrics.json first (so the folder never looks finished), then everything a run writes."""
    (output / METRICS_FILE).unlink(missing_ok=True)
    for child in output.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_output(output: pathlib.Path, resume: bool, overwrite: bool) -> Optional[pathlib.Path]:
    """Refuse to clobber: returns the checkpoint to resume from, if any. Creates nothing."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    if not output.exists() or overwrite:
        if overwrite and output.exists() and any(output.iterdir()) and not (output / RUN_FILE).exists():
            raise UsageError(f"--output {output} is not empty and was not written by spectral-peft; "
                             "--overwrite only replaces spectral-peft runs")
        return None
    if (output / METRICS_FILE).exists():
        if resume:
            return None  # the caller says it is finished
        raise UsageError(f"--output {output} holds a finished run (metrics.json); use another folder or --overwrite")
    checkpoint = find_checkpoint(output)
    if resume:
        if checkpoint is None and any(output.iterdir()) and not (output / RUN_FILE).exists():
            raise UsageError(f"--output {output} is not empty and was not written by spectral-peft")
        return checkpoint
    if any(output.iterdir()):
        if checkpoint is not None:
            raise UsageError(f"--output {output} holds an unfinished run with a checkpoint; pass --resume to continue "
                             "it or --overwrite to start again")
        raise UsageError(f"--output {output} is not empty; use another folder, or --overwrite if it is a "
                         "spectral-peft run")
    return None


# ---------------------------------------------------------------------------------------------------------------
# the job


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _constant(step: int) -> float:
    return 1.0


def _log(message: str, quiet: bool = False) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def quiet_libraries() -> None:
    """Register the methods with PEFT and keep transformers' info messages, download bars and deprecation notes
    about its own internals (raised from inside PEFT) out of the command's output."""
    import warnings

    from transformers.utils import logging as transformers_logging

    import spectral_peft  # noqa: F401  (registers the methods with PEFT)

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


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

    import torch

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---- everything that can fail on bad input, before anything is written
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
    total_steps = settings["steps"]
    stream = BatchStream(encoded["train"], args.batch_size, args.seed)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    base = load_base_model(info, task.kind, task.num_labels, tokenizer, task.label_names)
    head = head_name(base) if task.kind == CLASSIFICATION else None
    prior = None
    if settings["method"] == "s2ft" and checkpoint is None:
        prior = [stream.batch(i) for i in range(settings["prior_batches"])]
    model = build_method(settings, base, task, prior)

    # ---- from here on the output folder exists
    if args.overwrite and output.exists():
        _remove_outputs(output)
    output.mkdir(parents=True, exist_ok=True)
    from . import __version__

    run_info = {
        "method": settings["method"],
        "model": info.path,
        "model_arg": settings["model"],  # None: the default offline MiniLM (found again where evaluate runs)
        "task": task.name,
        "task_kind": task.kind,
        "seed": args.seed,
        "max_length": args.max_length,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "num_labels": task.num_labels,
        "label_names": task.label_names,
        "eval_batch_size": args.eval_batch_size,
        "settings": settings,
        "spectral_peft_version": __version__,
    }
    write_json(output / RUN_FILE, run_info)

    groups, kinds = parameter_groups(model, settings, head)
    kinds_of = {id(p): kind for group, kind in zip(groups, kinds) for p in group["params"]}
    counts = count_parameters(model, kinds_of)
    optimizer = torch.optim.AdamW(groups)
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_constant if kind == "locations" else _lr_lambda(total_steps, warmup) for kind in kinds]
    )

    history = {"loss": [], "lr": [], "phase": [], "validation": [], "step_times": [], "elapsed": 0.0, "peak": 0.0}
    start_step = 0
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if unexpected or trainable & set(missing):
            raise UsageError(f"the checkpoint in {output} does not fit this model "
                             f"(missing {sorted(trainable & set(missing))[:3]}, unexpected {unexpected[:3]})")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_step = checkpoint["step"]
        history = checkpoint["history"]
    schedule = None
    if settings["method"] == "loca":
        from . import LocaSchedule

        schedule = LocaSchedule(model, total_steps=total_steps)
        if checkpoint is not None:
            schedule.load_state_dict(checkpoint["loca_schedule"])
    if checkpoint is not None:
        torch.set_rng_state(checkpoint["rng"]["torch"])
        random.setstate(checkpoint["rng"]["python"])

    def checkpoint_state(step: int) -> dict:
        history["elapsed"] = history_elapsed_base + (time.perf_counter() - started)
        history["peak"] = max(history["peak"], peak_memory_mib())
        return {
            "version": 1, "step": step, "settings": settings, "model": _trainable_state(model),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loca_schedule": schedule.state_dict() if schedule is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "history": history,
        }

    history_elapsed_base = history["elapsed"]
    metric = main_metric(task.kind)
    sizes = {s: len(encoded[s]["labels"]) for s in SPLITS}
    what = {"loca": "LoCA", "s2ft": "S2FT", "fourierft": "FourierFT (stock PEFT)", "fastfourierft": "fast FourierFT",
            "lora": "LoRA (stock PEFT)", "full": "full fine-tuning"}[settings["method"]]
    _log(f"{what} on {info.display}, task {task.name} ({sizes['train']} train / {sizes['validation']} validation / "
         f"{sizes['test']} test{', ' + str(task.num_labels) + ' labels' if task.num_labels else ''}); trainable "
         f"parameters {counts['trainable_params']:,} of {counts['total_params']:,}; {total_steps} steps "
         f"({settings['steps_per_epoch']} per epoch)" + (f"; resuming at step {start_step}" if start_step else ""))

    from tqdm.auto import tqdm

    stop = total_steps if args.stop_after is None else min(total_steps, args.stop_after)
    progress = tqdm(total=total_steps, initial=start_step, desc=settings["method"], unit="step",
                    disable=True if args.quiet else None, dynamic_ncols=True, file=sys.stderr)
    model.train()
    step = start_step
    try:
        for step in range(start_step, stop):
            phase = schedule.phase() if schedule is not None else None
            tick = time.perf_counter()
            step_loss = 0.0
            for j in range(args.grad_accum):
                batch = stream.batch(step * args.grad_accum + j)
                loss = model(**batch).loss
                (loss / args.grad_accum).backward()
                step_loss += loss.item() / args.grad_accum
            if not math.isfinite(step_loss):
                raise TrainingError(f"the training loss is {step_loss} at step {step + 1}; try a smaller --lr "
                                    f"(now {settings['lr']:g})")
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule is not None:
                schedule.step()
            history["step_times"].append(time.perf_counter() - tick)
            history["loss"].append(step_loss)
            history["lr"].append(lr_now)
            history["phase"].append(phase)
            postfix = {"loss": f"{step_loss:.4f}", "lr": f"{lr_now:.2e}"}
            if phase is not None:
                postfix["phase"] = phase
            progress.set_postfix(postfix, refresh=False)
            progress.update(1)
            done = step + 1
            if (args.eval_every and done % args.eval_every == 0) or done == total_steps:
                result = evaluate_split(model, validation, task.kind, args.eval_batch_size)
                history["validation"].append({"step": done, **result})
                progress.write(_describe_metrics(f"step {done} validation", result), file=sys.stderr)
            if done < total_steps and ((args.save_every and done % args.save_every == 0) or done == stop):
                save_checkpoint(output, checkpoint_state(done))
    finally:
        progress.close()
    if stop < total_steps:
        print(f"stopped after step {stop} of {total_steps}; the checkpoint is in {output / CHECKPOINT}: rerun the "
              "same command with --resume to continue", file=sys.stderr)
        return 0

    test = evaluate_split(model, encoded["test"], task.kind, args.eval_batch_size)
    _log(_describe_metrics("test", test))
    files = save_model(model, output)
    from .plots import plot_training

    title = f"{settings['method']} on {pathlib.Path(task.name).name}"
    plot_training(output / PLOT_FILE, history["loss"], history["validation"], metric, title=title,
                  phases=history["phase"] if schedule is not None else None)
    times = history["step_times"]
    metrics = {
        "finished": True,
        "method": settings["method"],
        "model": info.path,
        "task": task.name,
        "task_kind": task.kind,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "settings": settings,
        **counts,
        "adapter_bytes": weight_bytes(files),
        "adapter_files": files,
        "steps": total_steps,
        "examples": sizes,
        "loss": history["loss"],
        "lr": history["lr"],
        "phase": history["phase"] if schedule is not None else None,
        "validation": history["validation"],
        "test": test,
        "wall_time_s": history_elapsed_base + (time.perf_counter() - started),
        "train_time_s": sum(times),
        "time_per_step_s": sorted(times)[len(times) // 2] if times else None,
        "mean_time_per_step_s": sum(times) / len(times) if times else None,
        "peak_memory_mib": max(history["peak"], peak_memory_mib()),
        "resumed_from_step": checkpoint["step"] if checkpoint is not None else None,
        "spectral_peft_version": __version__,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(output / METRICS_FILE, metrics)
    if not args.keep_checkpoint:
        for name in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp"):
            shutil.rmtree(output / name, ignore_errors=True)
    print(f"{_describe_metrics('test', test)}; {counts['trainable_params']:,} trainable parameters, adapter "
          f"{metrics['adapter_bytes']:,} bytes; {metrics['wall_time_s']:.0f} s; written to {output}")
    return 0


def _describe_metrics(what: str, result: dict) -> str:
    if "accuracy" in result:
        return f"{what}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}"
    return f"{what}: perplexity {result['perplexity']:.3f}, loss {result['loss']:.4f}"


def _check_same_settings(saved: dict, current: dict, output: pathlib.Path) -> None:
    for key in TRAINING_KEYS:
        if saved.get(key) != current.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} is {current.get(key)!r} but the checkpoint in {output} was made with "
                             f"{saved.get(key)!r}; rerun with the same options, or --overwrite to start again")


# ---------------------------------------------------------------------------------------------------------------
# evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    """``spectral-peft evaluate``: rebuild base + adapter from the folder, recompute the test metrics and compare
    them with metrics.json. Returns 0 when they match, 1 when not."""
    folder = pathlib.Path(args.adapter).expanduser()
    if not folder.is_dir():
        raise UsageError(f"adapter folder not found: {folder}")
    if not (folder / RUN_FILE).is_file():
        raise UsageError(f"{folder} has no run.json; it was not written by spectral-peft finetune")
    if not (folder / METRICS_FILE).is_file():
        raise UsageError(f"{folder} has no metrics.json: the run did not finish (resume it with finetune --resume)")
    try:
        run = json.loads((folder / RUN_FILE).read_text())
        recorded = json.loads((folder / METRICS_FILE).read_text())
    except (json.JSONDecodeError, OSError) as error:
        raise UsageError(f"cannot read {folder}: {_first_line(error)}") from None

    import torch

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task(run["task"], run["seed"], run["val_fraction"], run["test_fraction"])
    if task.label_names != run["label_names"]:
        raise UsageError(f"the labels of task '{run['task']}' are now {task.label_names}, the run had "
                         f"{run['label_names']}; the data changed")
    info = resolve_model(run["model_arg"])
    tokenizer = load_tokenizer(info)
    encoded = encode_task(task, tokenizer, run["max_length"], run["seed"], run["val_fraction"], run["test_fraction"])
    split = args.split
    if run["method"] == "full":
        full_info = ModelInfo(arg=str(folder), path=str(folder), config=None, decoder=info.decoder, local_only=True)
        model = load_base_model(full_info, run["task_kind"], run["num_labels"], tokenizer, run["label_names"])
    else:
        from peft import PeftModel

        base = load_base_model(info, run["task_kind"], run["num_labels"], tokenizer, run["label_names"])
        try:
            model = PeftModel.from_pretrained(base, str(folder))
        except Exception as error:  # noqa: BLE001
            raise UsageError(f"cannot load the adapter in {folder}: {_first_line(error)}") from None
    result = evaluate_split(model, encoded[split], run["task_kind"], run.get("eval_batch_size", 32))
    if split == "test":
        reference = recorded.get("test", {})
    else:
        reference = (recorded.get("validation") or [{}])[-1]
        if args.split == "validation" and recorded.get("args", {}).get("eval_examples"):
            print("note: the run validated on a subset (--eval-examples); this is the whole validation split",
                  file=sys.stderr)
    keys = [k for k in ("accuracy", "macro_f1", "perplexity", "loss") if k in result]
    print(f"{run['method']} adapter in {folder}, {split} split ({len(encoded[split]['labels'])} examples)")
    print(f"{'metric':<12} {'recomputed':>12} {'metrics.json':>13}  match")
    all_match = True
    for key in keys:
        mine, theirs = result[key], reference.get(key)
        tolerance = 1e-4 * max(1.0, abs(mine)) if key in ("loss", "perplexity") else 1e-9
        match = theirs is not None and abs(mine - theirs) <= tolerance
        all_match &= match
        shown = f"{theirs:.6f}" if theirs is not None else "-"
        print(f"{key:<12} {mine:>12.6f} {shown:>13}  {'yes' if match else 'NO'}")
    if not all_match:
        print("the recomputed metrics differ from metrics.json", file=sys.stderr)
        return 1
    return 0
