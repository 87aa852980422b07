"""What ``spectral-peft bench`` times: a base model with a batch (the shapes ``minilm``, ``llama`` and ``linear``),
and each method's variant on it, built through the method registry."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from .methods import BASE, BASE_LABEL, METHODS, RANK, bench_variants
from .models import load_base_model, resolve_model
from .tasks import CLASSIFICATION

VARIANTS = tuple(bench_variants())  # the reference first
LABELS = {BASE: BASE_LABEL, **bench_variants()}
# bench's variant of LoCA that trains its locations (the schedule's location phase)
LOCATION_PHASE = "loca-locations"
_METHOD_OF = {variant: method for method in METHODS.values() for variant in method.timed_variants()}


class Workload:
    """A base model, a batch, the modules to adapt and the trainable head (None for the bare linear layer)."""

    def __init__(self, model, batch: dict, targets: list, head: Optional[str], loss: Callable):
        self.model, self.batch, self.targets, self.head, self.loss = model, batch, targets, head, loss

    def frozen_parameters(self) -> list:
        """The base model's parameters outside the trainable head."""
        return [p for name, p in self.model.named_parameters() if not (self.head and name.startswith(self.head))]


def _minilm(device, dtype, path: Optional[str] = None, random_weights: bool = False, batch_size: int = 32,
            length: int = 128) -> Workload:
    # random_weights: the same architecture and so the same step time, without the weights file
    model = load_base_model(resolve_model(path), CLASSIFICATION, 5, random_weights=random_weights)
    batch = {
        "input_ids": torch.randint(1000, 20000, (batch_size, length)),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 5, (batch_size,)),
    }
    return Workload(model.to(device, dtype), _to(batch, device), ["query", "value"], "classifier", _model_loss)


def _llama(device, dtype, hidden: int = 2048, intermediate: int = 5632) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    # Realistic widths (TinyLlama's at 2048), two layers; a 1000-token vocabulary so that the output head does not
    # dominate a step that is meant to time the adapted projections.
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=1000, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 1000, (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return Workload(model.to(device, dtype), _to(batch, device), targets, "lm_head", _model_loss)


class _Linear(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)

    def forward(self, x, **_):
        return self.proj(x)


def _linear(width: int, tokens: int, device, dtype) -> Workload:
    model = _Linear(width)
    x = torch.randn(tokens, width)
    # the input needs a gradient, as a hidden layer's does (and a frozen base step then has something to do)
    batch = {"x": x.to(device, dtype).requires_grad_(True)}
    return Workload(model.to(device, dtype), batch, ["proj"], None, lambda model, batch: model(**batch).float().pow(2).mean())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _model_loss(model, batch):
    return model(**batch).loss


def workload(shape: str, device, dtype, width: int = 1024, tokens: int = 1024, model: Optional[str] = None,
             random_weights: bool = False) -> Workload:
    """The base model and batch of a shape (``width`` and ``tokens``: the linear layer's)."""
    if shape == "minilm":
        return _minilm(device, dtype, model, random_weights)
    if shape == "minilm-short":  # short inputs, small batches: 16 x 64 tokens
        return _minilm(device, dtype, model, random_weights, batch_size=16, length=64)
    if shape == "llama":
        return _llama(device, dtype)
    if shape == "llama-1024":  # a narrower Llama-style model
        return _llama(device, dtype, hidden=1024, intermediate=2816)
    return _linear(width, tokens, device, dtype)


def method_of(variant: str):
    """The registry's method a variant belongs to."""
    return _METHOD_OF[variant]


def build_variant(variant: str, work: Workload, n: int, rank: int):
    """A fresh model for ``variant`` sharing the frozen base weights with ``work.model`` (no copy of them)."""
    if variant != BASE and variant not in _METHOD_OF:
        raise ValueError(f"unknown method {variant!r}; choose from {', '.join((BASE,) + VARIANTS)}")
    base = work.model
    frozen = {id(p): p for p in work.frozen_parameters()}
    model = copy.deepcopy(base, memo=frozen)  # shares frozen weights: a merged adapter would change them all
    for p in model.parameters():
        p.requires_grad_(False)
    if variant == BASE:
        if work.head:
            for p in model.get_submodule(work.head).parameters():
                p.requires_grad_(True)
        return model
    method = _METHOD_OF[variant]
    # each config's defaults, but LoRA at lora_alpha = r and S2FT with a one-batch gradient prior (quick to build)
    settings = {"n_frequency": n, "rank": rank, "scaling": 1.0 if method.budget == RANK else None,
                "s2ft_prior": "gradient", "prior_batches": 1}
    peft_fields = {"target_modules": work.targets, "modules_to_save": [work.head] if work.head else None}
    peft_model = method.build(model, settings, peft_fields, [work.batch] if method.uses_prior else None)
    if variant == LOCATION_PHASE:
        from spectral_peft.loca import LocaLinear

        for layer in peft_model.modules():
            if isinstance(layer, LocaLinear):
                layer.set_phase("default", train_coefficients=False, train_locations=True)
    return peft_model
