"""``spectral-peft analyze``: the spectrum of real weight changes, and the papers' claims measured on it.

For each target matrix the weight change ``dW`` (tuned minus base, or an adapter's ``get_delta_weight``) is
measured (:func:`spectral_peft.analysis.analyze_matrix`): the share of its energy in the top-k coefficients of the
2-D DCT and DFT in the original order, under a random permutation of rows and columns (control), under the S2FT
ordering computed from ``dW`` itself (oracle) and under the ordering computed from a gradient prior (what S2FT can
do before training); the spectral flatness; and the relative Frobenius error ``||dW - A||_F / ||dW||_F`` of the
best approximation ``A`` at equal parameter budgets. With an adapter and a fully tuned reference, the adapter's
locations are compared with the top-energy cells of the full ``dW``. Writes analysis.md, analysis.json, energy.png
and errors.png to ``--output`` (:mod:`.analyze_report`).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from spectral_peft.analysis import FRACTIONS, RANKS, analyze_matrix, compare_locations, white_noise_reference
from spectral_peft_cli.arguments import DATA_DEFAULTS, option_tokens
from spectral_peft_cli.checks import adapter_hint

from .analyze_report import (
    APPROXIMATIONS,
    ENERGY_PLOT,
    ERROR_PLOT,
    JSON_FILE,
    REPORT_FILE,
    layer_type,
    render_markdown,
    summarize,
    verdict_counts,
)
from .errors import UsageError, first_line
from .files import write_json, write_text
from .models import HEAD_NAMES, ModelInfo, check_compatible, head_name, load_base_model, load_processor, resolve_model
from .settings import target_module_list
from .tasks import CLASSIFICATION, IMAGE_CLASSIFICATION, LANGUAGE_MODELING, Task, is_classification


def _run_json(folder: Optional[str]) -> dict:
    if folder is None:
        return {}
    path = pathlib.Path(folder).expanduser() / "run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None


def _saved_head_labels(folder: str) -> Optional[int]:
    """Outputs of the classification head saved with an adapter (modules_to_save), if it has one."""
    from safetensors import safe_open

    path = pathlib.Path(folder).expanduser() / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if any(key.endswith(f".{head}.weight") or key.endswith(f".{head}.modules_to_save.default.weight")
                   for head in HEAD_NAMES):
                return int(f.get_slice(key).get_shape()[0])
    return None


def _settings(args: argparse.Namespace) -> dict:
    """The data options: given ones, else the run.json of --tuned (then --adapter), else finetune's defaults."""
    runs = [r for r in (_run_json(args.tuned), _run_json(args.adapter)) if r]
    run = runs[0] if runs else {}
    recorded = {**run.get("settings", {}), **run}
    settings = {}
    for key, default in DATA_DEFAULTS.items():
        given = getattr(args, key)
        settings[key] = given if given is not None else recorded.get(key, default)
    known_data = args.task is not None or "task" in recorded or args.base is None
    settings["prior"] = args.prior if args.prior != "auto" else "gradient" if known_data else "none"
    settings["prior_batches"] = args.prior_batches
    return settings


def _linear_weights(model) -> dict:
    """Every Linear / Conv1D of ``model`` but the classification head: name -> (module, transposed)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = head_name(model)
    found = {}
    for name, module in model.named_modules():
        if head is not None and (name == head or name.startswith(head + ".")):
            continue  # the base's head is a fresh random initialisation, not a pretrained weight
        if isinstance(module, (nn.Linear, Conv1D)) and module.weight.dim() == 2:
            found[name] = (module, isinstance(module, Conv1D))
    return found


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def tuned_deltas(base, tuned, targets: Optional[list[str]], tuned_arg: str) -> dict:
    """name -> dW (out x in, float32) for the Linear weights that differ between ``tuned`` and ``base``."""
    if base.config.model_type != tuned.config.model_type:
        raise UsageError(f"--tuned {tuned_arg} is a {tuned.config.model_type} model but --base is a "
                         f"{base.config.model_type}: different architectures")
    mine, theirs = _linear_weights(base), _linear_weights(tuned)
    if targets is not None:
        for target in targets:
            if not any(_matches(name, [target]) for name in mine):
                raise UsageError(f"--target-modules: '{target}' matches no Linear module of --base")
        mine = {name: v for name, v in mine.items() if _matches(name, targets)}
    deltas = {}
    for name, (module, transposed) in mine.items():
        if name not in theirs:
            raise UsageError(f"--tuned {tuned_arg} has no module '{name}' of --base: different architectures")
        other = theirs[name][0].weight
        if other.shape != module.weight.shape:
            raise UsageError(f"module '{name}' is {tuple(module.weight.shape)} in --base but {tuple(other.shape)} in "
                             f"--tuned {tuned_arg}: different architectures")
        dw = (other.detach().float() - module.weight.detach().float())
        if torch.any(dw != 0):
            deltas[name] = dw.T if transposed else dw
    if not deltas:
        raise UsageError(f"no {'target ' if targets else ''}Linear weight differs between --base and --tuned "
                         f"{tuned_arg}")
    return deltas


def adapter_layers(peft_model) -> dict:
    """name (relative to the transformers model) -> the adapter layer, for every layer with a dW."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = peft_model.base_model.model
    return {name: module for name, module in inner.named_modules()
            if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight")}


@torch.no_grad()
def adapter_delta(layer, adapter_name: str = "default") -> torch.Tensor:
    """An adapter layer's dW as out x in float32 (stock PEFT layers give it in the weight's layout)."""
    from peft.utils.other import transpose

    from spectral_peft.layer import SpectralLinear

    dw = layer.get_delta_weight(adapter_name).detach().float().cpu()
    if isinstance(layer, SpectralLinear):
        return dw
    return transpose(dw, getattr(layer, "fan_in_fan_out", False))


def _resolve(option: str, name: Optional[str]):
    """finetune's model lookup, its errors naming the option (and saying when a folder holds an adapter)."""
    try:
        return resolve_model(name)
    except UsageError as error:
        raise UsageError(f"{option}: {error}{adapter_hint(name)}") from None


@dataclass
class _Base:
    """The base model as the analysis loads it, with what it was loaded for."""

    info: ModelInfo
    tokenizer: object
    task: Optional[Task]  # the gradient prior's data (None without a prior)
    kind: str
    model: object


def _load_base(args: argparse.Namespace, settings: dict) -> _Base:
    info = _resolve("--base", args.base)
    task = None
    if settings["prior"] == "gradient":
        from .tasks import load_task

        task = load_task(settings["task"], settings["seed"], settings["val_fraction"], settings["test_fraction"],
                         settings)
        check_compatible(info, task)
        kind, num_labels, label_names = task.kind, task.num_labels, task.label_names
    else:
        kind = LANGUAGE_MODELING if info.decoder else IMAGE_CLASSIFICATION if info.image else CLASSIFICATION
        # no task: the head as the base checkpoint has it (its weights are not analysed)
        num_labels = getattr(info.config, "num_labels", 2) if is_classification(kind) else None
        label_names = None
    tokenizer = load_processor(info, kind)
    if args.adapter is not None and is_classification(kind):
        # the adapter's saved head must fit the base's: its run.json, else the saved head's own size
        adapter_run = _run_json(args.adapter)
        if adapter_run.get("num_labels"):
            num_labels, label_names = adapter_run["num_labels"], adapter_run.get("label_names")
        elif (saved_labels := _saved_head_labels(args.adapter)) is not None:
            num_labels, label_names = saved_labels, None
    torch.manual_seed(settings["seed"])  # the head's initialisation, as finetune draws it
    # the head is never analysed: one of another size than the checkpoint's is drawn fresh
    model = load_base_model(info, kind, num_labels, tokenizer, label_names, fresh_head=True)
    return _Base(info, tokenizer, task, kind, model)


def _tuned_changes(args: argparse.Namespace, base: _Base) -> dict:
    """--tuned minus --base: name -> dW of each (target) Linear weight that changed."""
    info = _resolve("--tuned", args.tuned)
    labels = getattr(info.config, "num_labels", None) if is_classification(base.kind) else None
    tuned = load_base_model(info, base.kind, labels, base.tokenizer)
    targets = target_module_list(args.target_modules) if args.target_modules is not None else None
    return tuned_deltas(base.model, tuned, targets, args.tuned)


def _load_adapter(args: argparse.Namespace, base: _Base, deltas: dict) -> tuple[dict, dict, object]:
    """The adapter's layers and config, and the changes to analyse: ``deltas`` (the tuned model's, which must
    cover every adapted layer) or else the adapter's own."""
    from peft import PeftConfig, PeftModel

    try:
        config = PeftConfig.from_pretrained(args.adapter)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), args.adapter)
    except Exception as error:  # noqa: BLE001  (PEFT raises many kinds for an adapter that does not fit)
        raise UsageError(f"--adapter {args.adapter} does not fit --base {base.info.name}: "
                         f"{first_line(error)}") from None
    layers = adapter_layers(peft_model)
    if not layers:
        raise UsageError(f"--adapter {args.adapter} adapts no layer of --base")
    if not deltas:
        deltas = {name: adapter_delta(layer) for name, layer in layers.items()}
        deltas = {name: dw for name, dw in deltas.items() if torch.any(dw != 0)}
        if not deltas:
            raise UsageError(f"the adapter in {args.adapter} is all zero: nothing to analyse")
    elif not set(layers) <= set(deltas):
        missing = sorted(set(layers) - set(deltas))
        raise UsageError(f"{missing[0]}, a target of --adapter {args.adapter}, is not among the analysed "
                         f"changes of --tuned {args.tuned} (unchanged, or left out by --target-modules)"
                         + (f"; {len(missing) - 1} more" if len(missing) > 1 else ""))
    return deltas, layers, config


def _gradient_priors(base: _Base, settings: dict, names, quiet: bool) -> dict:
    """S2FT's gradient prior of each named weight: minus the summed gradient over the first training batches."""
    from spectral_peft.s2ft import summed_gradients

    from .data import BatchStream
    from .tasks import encode_task

    encoded = encode_task(base.task, base.tokenizer, settings["max_length"], settings["seed"],
                          settings["val_fraction"], settings["test_fraction"])
    stream = BatchStream(encoded["train"], settings["batch_size"], settings["seed"])
    linear = _linear_weights(base.model)
    weights = {name: (linear[name][0].weight, linear[name][1]) for name in names}
    batches = (stream.batch(i) for i in range(settings["prior_batches"]))
    from .progress import track

    return summed_gradients(base.model, weights, batches, settings["prior_batches"], desc="gradient prior",
                            progress=None if quiet else track)


def _measure(deltas: dict, priors: dict, base_model, layers: dict, config, seed: int, with_tuned: bool,
             quiet: bool) -> list[dict]:
    """Every measure of each matrix; with a tuned model, where a spectral adapter put its coefficients."""
    from tqdm.auto import tqdm

    from spectral_peft.layer import SpectralLinear

    matrices = []
    progress = tqdm(deltas.items(), total=len(deltas), desc="analyze", unit="matrix", disable=True if quiet
                    else None, dynamic_ncols=True, file=sys.stderr)
    for name, dw in progress:
        progress.set_postfix_str(name, refresh=False)
        record = {"name": name, "type": layer_type(name), **analyze_matrix(dw, priors.get(name), seed=seed)}
        record["relative_norm"] = float(dw.norm() / base_model.get_submodule(name).weight.detach().float().norm())
        if with_tuned and isinstance(layers.get(name), SpectralLinear):
            record["locations"] = compare_locations(layers[name], "default", dw, config)
        matrices.append(record)
    progress.close()
    return matrices


def run_analyze(args: argparse.Namespace) -> int:
    """``spectral-peft analyze``; raises UsageError for bad input."""
    from .models import quiet_libraries

    settings = _settings(args)
    quiet_libraries(args.threads)
    # ---- every input read and checked before anything is written
    base = _load_base(args, settings)
    deltas, layers, config = {}, {}, None
    if args.tuned is not None:
        deltas = _tuned_changes(args, base)
    if args.adapter is not None:
        deltas, layers, config = _load_adapter(args, base, deltas)
    priors = _gradient_priors(base, settings, deltas, args.quiet) if settings["prior"] == "gradient" else {}
    matrices = _measure(deltas, priors, base.model, layers, config, settings["seed"], args.tuned is not None,
                        args.quiet)
    shapes = sorted({tuple(r["shape"]) for r in matrices})
    result = {
        "command": "spectral-peft analyze " + " ".join(option_tokens(vars(args), skip=("func", "command"))),
        "inputs": {"base": base.info.name, "tuned": args.tuned, "adapter": args.adapter,
                   "adapter_type": str(getattr(config.peft_type, "value", config.peft_type)) if config else None,
                   "source": "--tuned minus --base" if args.tuned else "the adapter"},
        "settings": settings,
        "fractions": list(FRACTIONS),
        "ranks": list(RANKS),
        "approximations": APPROXIMATIONS,
        "error_measure": "relative Frobenius error ||dW - A||_F / ||dW||_F",
        "matrices": matrices,
        "summary": summarize(matrices),
        "counts": verdict_counts(matrices),
        "white_noise": {f"{m}x{n}": white_noise_reference((m, n), settings["seed"]) for m, n in shapes},
    }
    output = pathlib.Path(args.output).expanduser()
    _write_outputs(output, result)
    counts = result["counts"]
    print(f"analysed {len(matrices)} matrices; top-P DCT beats rank-r SVD in {counts['dct_top_beats_svd']} of "
          f"{counts['pairs']} (matrix, budget) pairs; written to {output}")
    return 0


def _write_outputs(output: pathlib.Path, result: dict) -> None:
    from .plots import plot_energy_curves, plot_errors

    output.mkdir(parents=True, exist_ok=True)
    write_json(output / JSON_FILE, result)
    write_text(output / REPORT_FILE, render_markdown(result))
    plot_energy_curves(output / ENERGY_PLOT, result)
    plot_errors(output / ERROR_PLOT, result)
