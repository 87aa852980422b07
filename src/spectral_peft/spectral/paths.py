"""Which of the three ways of computing ``x @ dW^T`` a layer call takes: a cost estimate per device."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .activation import apply_delta
from .factored import factored_forward
from .spectrum import Spectrum, dense_forward

# the three ways of computing x @ dW^T, by the name a layer's ``spectral_path`` gives them
DELTA_PRODUCTS: dict[str, Callable[[torch.Tensor, Spectrum], torch.Tensor]] = {
    "activation": apply_delta, "dense": dense_forward, "factored": factored_forward,
}


def _dense_matmuls(training: bool, folded: bool) -> int:
    """The dense path's T x M x N products: forward, input gradient and weight gradient in training, or only the
    layer's own product when dW is folded into the frozen weight (none then in inference)."""
    return (1 if folded else 3) if training else (0 if folded else 1)


def prefers_dense(tokens: int, spec: Spectrum, folded: bool = False) -> bool:
    """On a CPU, whether building dW and multiplying densely beats the transforms on ``tokens`` rows of activations.

    A cost model in nanoseconds, fitted on a 2-core x86 CPU: the activation path costs per token and feature plus
    per token and coefficient; the dense path costs T x M x N matmuls plus the 2-D transforms that build dW (and, in
    training, its spectral gradient). Small layers with many tokens go dense; large layers through the activations.
    """
    m, n = spec.out_features, spec.in_features
    training = torch.is_grad_enabled()
    matmuls = _dense_matmuls(training, folded)
    passes = 1.0 if training else 0.5  # inference runs the forward half of either path
    activation = passes * (41.0 * tokens * (m + n) + 27.0 * tokens * spec.coefficients.numel())
    dense = 0.031 * matmuls * tokens * m * n + passes * 9.4 * m * n * (math.log2(max(m, 2)) + math.log2(max(n, 2)))
    return dense < activation


# multiply-adds a pass of the 2-D transforms over M x N is worth on a GPU, and the fixed cost of their many small
# kernels per direction, fitted on an H100 in bf16 (benchmarks/path_choice.py)
_GPU_PASS_MACS = 2500.0
_GPU_DENSE_FIXED_MACS = 1e11


def prefers_factored(tokens: int, spec: Spectrum, folded: bool = False) -> bool:
    """On a GPU, whether the factored path's thin products beat the dense path, by a count of multiply-adds.

    The factored path multiplies T x (M + N) by its n columns (2n for the DFT) twice in training, once in
    inference; the dense path T x M x N three times in training (once folded), once in inference (none folded),
    and its 2-D transforms pass over M x N about twenty times in training (ten in inference), plus a fixed cost of
    launching their kernels: such layers are bound by kernel launches as much as by arithmetic.
    """
    m, n = spec.out_features, spec.in_features
    training = torch.is_grad_enabled()
    columns = spec.coefficients.numel() * (2 if spec.transform == "dft" else 1)
    matmuls = _dense_matmuls(training, folded)
    directions = 2 if training else 1
    factored = directions * tokens * columns * (m + n)
    dense = matmuls * tokens * m * n + directions * (10 * _GPU_PASS_MACS * m * n + _GPU_DENSE_FIXED_MACS)
    return factored < dense


def choose_path(tokens: int, spec: Spectrum, device: torch.device = torch.device("cpu"), folded: bool = False) -> str:
    """The cheapest path for ``tokens`` rows: on a CPU the activation or the dense path (:func:`prefers_dense`); on
    a GPU, where the activation path is many small kernels, the factored or the dense path
    (:func:`prefers_factored`)."""
    if device.type == "cpu":
        return "dense" if prefers_dense(tokens, spec, folded) else "activation"
    return "factored" if prefers_factored(tokens, spec, folded) else "dense"
