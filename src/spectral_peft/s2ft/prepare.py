"""Building an S2FT model: a prior weight change, orderings from it, and the locations of its largest energy."""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from tqdm.auto import tqdm

from ..analysis import permute, top_power_cells, transform_2d
from ..spectral import module_generator
from ..transforms import COMPUTE_DTYPES
from .config import S2FTConfig
from .layer import S2FTLinear
from .ordering import nearest_neighbor_orders


def _shown(progress: Optional[Callable], iterable: Iterable, total: int, desc: str, unit: str) -> Iterable:
    """``iterable`` through ``progress`` (tqdm's signature; tqdm by default), or as it is where ``progress`` is None."""
    return iterable if progress is None else progress(iterable, total=total, desc=desc, unit=unit, leave=False)


def _loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"prepare_s2ft: batches must yield dicts of model inputs with labels, got {type(batch).__name__}")
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("prepare_s2ft: the model returned no loss for a batch; batches must include labels")
    if not torch.isfinite(loss):
        raise ValueError(f"prepare_s2ft: the loss of a prior batch is {loss.item()}")
    return loss


@contextlib.contextmanager
def _kept_state(model: nn.Module, requires_grad: bool = True) -> Iterator[None]:
    """Restore every module's train/eval mode (and, optionally, every ``requires_grad`` flag) on the way out."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()] if requires_grad else []
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


def _remove_adapters(tuner_model: nn.Module, model: nn.Module, had_config: bool) -> None:
    """Undo get_peft_model on ``model``: originals back in place of modules_to_save copies, layers unloaded."""
    inner = tuner_model.base_model.model
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent_name), child, module.original_module)
    tuner_model.base_model.unload()
    if not had_config and hasattr(model, "peft_config"):
        del model.peft_config


def gradient_prior(model: nn.Module, layers: list[S2FTLinear], batches: Iterable, num_batches: int,
                   progress: Optional[Callable] = tqdm) -> dict[str, torch.Tensor]:
    """Minus the gradient of the loss w.r.t. each target weight, summed over ``num_batches`` batches.

    Only the target weights take gradients (through ``torch.autograd.grad``, so no ``.grad`` is touched and
    no optimizer state exists); every ``requires_grad`` flag and the train/eval mode are restored.
    """
    weights = {layer.module_name: (layer.get_base_layer().weight, layer.fan_in_fan_out) for layer in layers}
    return summed_gradients(model, weights, batches, num_batches, progress=progress)


def summed_gradients(model: nn.Module, weights: Mapping[str, tuple[torch.Tensor, bool]], batches: Iterable,
                     num_batches: int, desc: str = "S2FT gradient prior",
                     progress: Optional[Callable] = tqdm) -> dict[str, torch.Tensor]:
    """Minus the summed gradient of the loss over ``num_batches`` batches, for each named weight of ``model``.

    ``weights`` maps a name to ``(weight, transposed)``; a transposed (Conv1D, in x out) weight's gradient is
    returned as out x in. Results are float32 on the CPU. The model's ``requires_grad`` flags and train/eval mode
    are restored; the forward passes run in eval mode (no dropout: the same prior on every rank and rerun).
    """
    priors = {name: torch.zeros(w.shape[::-1] if transposed else w.shape) for name, (w, transposed) in weights.items()}
    tensors = [w for w, _ in weights.values()]
    seen = 0
    with _kept_state(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for w in tensors:
            w.requires_grad_(True)
        model.eval()
        prior_batches = itertools.islice(batches, num_batches)
        for batch in _shown(progress, prior_batches, total=num_batches, desc=desc, unit="batch"):
            grads = torch.autograd.grad(_loss(model, batch), tensors)
            for (name, (_, transposed)), grad in zip(weights.items(), grads):
                priors[name] -= (grad.T if transposed else grad).detach().float().cpu()
            seen += 1
    if seen == 0:
        raise ValueError("prepare_s2ft: the batch iterable yielded no batch")
    return priors


def _input_directions(lora_model: nn.Module, batch: Mapping, rank: int) -> dict[str, torch.Tensor]:
    """The top ``rank`` right singular vectors (rows) of each LoRA layer's input on ``batch``, not centred."""
    directions = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            # eigenvectors of X^T X, largest first: the right singular vectors of X, without a tokens x d SVD
            directions[name] = torch.linalg.eigh(x.T @ x).eigenvectors.flip(-1)[:, :rank].T
        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in lora_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and "s2ft_prior" in module.lora_A
    ]
    try:
        with torch.no_grad():
            _loss(lora_model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return directions


def lora_prior(model: nn.Module, config: S2FTConfig, batches: Iterable,
               progress: Optional[Callable] = tqdm) -> dict[str, torch.Tensor]:
    """``scaling * B @ A`` of each target after a short LoRA warm-up with stock PEFT on a throw-away adapter.

    ``A`` starts at the top principal directions of the layer's input on the first batch (``B`` at zero, as
    stock), then ``prior_steps`` Adam or plain SGD steps (``prior_optimizer``) in eval mode train the adapter. The
    LoRA layers are removed afterwards (never merged), so the base weights are bit-identical.
    """
    lora_config = LoraConfig(
        r=config.prior_rank,
        lora_alpha=config.prior_rank,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
    )
    had_config = hasattr(model, "peft_config")
    with _kept_state(model):
        lora_model = get_peft_model(model, lora_config, adapter_name="s2ft_prior")
        try:
            # eval mode: no dropout noise in the warm-up (and every rank and rerun gets the same prior)
            lora_model.eval()
            cached = itertools.cycle(batches)
            first = next(cached, None)
            if first is None:
                raise ValueError("prepare_s2ft: the batch iterable yielded no batch")
            # A weight gradient G = sum_t delta_t x_t^T lies in the span of the inputs x_t, so with A's rows on the
            # inputs' top directions the first SGD step gives B A = -lr G A^T A, G's best rank-r part on that span;
            # a random A keeps only a random r-dimensional slice of it (docs/s2ft.md, "How well the priors point")
            for name, rows in _input_directions(lora_model, first, config.prior_rank).items():
                lora_a = lora_model.base_model.model.get_submodule(name).lora_A["s2ft_prior"].weight
                with torch.no_grad():
                    lora_a[: rows.shape[0]] = rows.to(lora_a)
            # half-precision trainable copies (a modules_to_save head of an fp16 model) would turn NaN under
            # Adam (its eps rounds to 0 in fp16): the warm-up trains the float32 LoRA factors only then
            trainable = [p for p in lora_model.parameters() if p.requires_grad and p.dtype in COMPUTE_DTYPES]
            optimizer_class = torch.optim.Adam if config.prior_optimizer == "adam" else torch.optim.SGD
            optimizer = optimizer_class(trainable, lr=config.warm_up_lr)
            warm_up = itertools.chain([first], itertools.islice(cached, config.prior_steps - 1))
            for batch in _shown(progress, warm_up, total=config.prior_steps, desc="S2FT LoRA prior", unit="step"):
                _loss(lora_model, batch).backward()
                optimizer.step()
                lora_model.zero_grad(set_to_none=True)
            priors = {}
            for name, module in lora_model.base_model.model.named_modules():
                if isinstance(module, LoraLayer) and "s2ft_prior" in module.lora_A:
                    a = module.lora_A["s2ft_prior"].weight
                    b = module.lora_B["s2ft_prior"].weight
                    priors[name] = (module.scaling["s2ft_prior"] * (b @ a)).detach().float().cpu()
        finally:
            _remove_adapters(lora_model, model, had_config)
    return priors


def top_cells(spectrum: torch.Tensor, n: int, transform: str) -> torch.Tensor:
    """The ``n`` coefficients of largest magnitude of a 2-D ``spectrum`` (complex for the DFT) as (2, n) long cells;
    for the DFT one cell of each conjugate pair (:func:`~spectral_peft.analysis.top_power_cells` of its power)."""
    return top_power_cells(spectrum.abs().pow(2), n, transform)


def prior_orders(prior: torch.Tensor, config: S2FTConfig, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column orders of a target matrix from its ``prior`` (out x in), as ``config.ordering`` says:
    the nearest-neighbour chains (S2FT), the identity, or random permutations seeded by ``ordering_seed`` and the
    module's name (the same on every rank and rerun)."""
    rows, cols = prior.shape
    if config.ordering == "none":
        return torch.arange(rows), torch.arange(cols)
    if config.ordering == "random":
        generator = module_generator(config.ordering_seed, module_name)
        return torch.randperm(rows, generator=generator), torch.randperm(cols, generator=generator)
    return nearest_neighbor_orders(prior, refine_passes=config.refine_passes)


def _all_reduce_priors(priors: dict[str, torch.Tensor], mode: str) -> None:
    """Make every rank of a distributed run hold the same priors (summed gradients, or rank 0's LoRA)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name in sorted(priors):
        if mode == "gradient":
            torch.distributed.all_reduce(priors[name])
        else:
            torch.distributed.broadcast(priors[name], src=0)


def prepare_s2ft(model: nn.Module, config: S2FTConfig, batches: Iterable, adapter_name: str = "default",
                 progress: Optional[Callable] = tqdm) -> PeftModel:
    """Wrap ``model`` with an S2FT adapter ready to train.

    Estimates a prior weight change per target matrix from ``batches`` (dicts of model inputs with labels, as a
    ``DataLoader`` yields them), orders rows and columns of each prior by the nearest-neighbour chain (or as
    ``config.ordering`` says: the identity or a random permutation, the ablations of the reordering), and places
    the ``n_frequency`` coefficients at the largest-energy cells of the permuted prior's spectrum. Coefficients
    start at zero, so the returned model computes exactly what ``model`` did. Under ``torch.distributed`` every
    rank ends with the same orderings and locations. ``progress`` wraps the prior's and the orderings' loops, with
    tqdm's signature (tqdm itself by default; None shows nothing).
    """
    if not isinstance(config, S2FTConfig):
        raise TypeError(f"prepare_s2ft needs an S2FTConfig, got {type(config).__name__}")
    if isinstance(model, PeftModel):
        raise TypeError(
            "prepare_s2ft takes the base model, not a PeftModel: it would wrap the PeftModel in another one; pass "
            "model.get_base_model() of a fresh model, or merge_and_unload() the other adapter first"
        )
    lora_priors = lora_prior(model, config, batches, progress) if config.prior == "lora" else None
    had_config = hasattr(model, "peft_config")
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    try:
        layers = [m for m in peft_model.modules() if isinstance(m, S2FTLinear) and adapter_name in m.s2ft_coefficients]
        if lora_priors is None:
            priors = gradient_prior(peft_model, layers, batches, config.prior_batches, progress)
        else:
            missing = [layer.module_name for layer in layers if layer.module_name not in lora_priors]
            if missing:
                raise ValueError(f"prepare_s2ft: the LoRA warm-up did not cover {missing}")
            priors = {layer.module_name: lora_priors[layer.module_name] for layer in layers}
        _all_reduce_priors(priors, config.prior)
        placements = {}
        for layer in _shown(progress, layers, total=len(layers), desc="S2FT orderings", unit="matrix"):
            prior = priors[layer.module_name]
            if not torch.isfinite(prior).all():
                raise ValueError(f"prepare_s2ft: the prior of module '{layer.module_name}' contains NaN or Inf")
            n = layer.s2ft_coefficients[adapter_name].numel()
            row_order, col_order = prior_orders(prior, config, layer.module_name)
            spectrum = transform_2d(permute(prior, row_order, col_order), config.transform)
            placements[layer] = (row_order, col_order, top_cells(spectrum, n, config.transform))
        # only now that every matrix succeeded is anything installed
        for layer, (row_order, col_order, cells) in placements.items():
            layer.set_orders(adapter_name, row_order, col_order)
            layer.set_locations(adapter_name, cells)
    except BaseException:
        _remove_adapters(peft_model, model, had_config)
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    finally:
        # the caller's train/eval mode, module by module (the new wrappers follow the model's own flag)
        known = {id(module) for module, _ in modes}
        for module in peft_model.modules():
            if id(module) not in known:
                module.training = modes[0][1]  # the model's own mode
        for module, mode in modes:
            module.training = mode
    return peft_model
