"""One adapter's sparse spectrum, the gradients read off the spectral gradient, and the dense ``dW``.

``dW = scaling * P_row^T (T_M^T S T_N) P_col^T``: ``S`` is an M x N spectrum with ``n`` non-zero coefficients
``a_i`` at cells ``(r_i, c_i)``; ``T`` is the orthonormal DCT-II (``transform="dct"``) or the inverse DFT with the
real part taken (``"dft"``, FourierFT's convention: ``dW = scaling * Re(ifft2(S))``); ``P_row``/``P_col`` are
optional orderings (S2FT).

Every path gives the coefficient gradients and LoCA's finite-difference location gradients from the spectral
gradient ``K = dL/dS`` evaluated at each cell and its four neighbours (:func:`stencil_points`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from ..transforms import COMPUTE_DTYPES, idct, inverse_order

if TYPE_CHECKING:
    from .cache import Placement, Workspace

TRANSFORMS = ("dct", "dft")


@dataclass
class Spectrum:
    """Everything one adapter of one layer contributes to ``dW`` (``M`` outputs, ``N`` inputs)."""

    coefficients: torch.Tensor  # (n,) float
    cells: torch.Tensor  # (2, n) long: row (output frequency) and column (input frequency) of each coefficient
    out_features: int
    in_features: int
    scaling: float
    transform: str = "dct"
    row_order: Optional[torch.Tensor] = None  # (M,) long permutation, S2FT
    col_order: Optional[torch.Tensor] = None  # (N,) long permutation, S2FT
    locations: Optional[torch.Tensor] = None  # (2, n) float parameter that receives location gradients (LoCA)
    train_coefficients: bool = True
    train_locations: bool = False
    # what the paths keep between calls: the layer's, or None to build what a call needs for that call alone
    placement: Optional["Placement"] = None  # what the cells and orders fix (sparsity, reorders, basis vectors)
    workspace: Optional["Workspace"] = None  # scratch buffers and an input spectrum shared by layers

    @property
    def trains_locations(self) -> bool:
        """Whether the locations get gradients (LoCA's location phases)."""
        return self.locations is not None and self.train_locations


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the transforms compute in for inputs of ``dtype`` (half precision: float32)."""
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


def stencil_points(spec: Spectrum) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Every point of ``K`` the gradients need, as (rows, cols), to evaluate in one call: the cells (when the
    coefficients train), then their four neighbours (when the locations train); None when nothing trains."""
    rows, cols = spec.cells[0], spec.cells[1]
    points = [(rows, cols)] if spec.train_coefficients else []
    if spec.trains_locations:
        m, n = spec.out_features, spec.in_features
        points += [
            ((rows + 1).clamp(max=m - 1), cols), ((rows - 1).clamp(min=0), cols),
            (rows, (cols + 1).clamp(max=n - 1)), (rows, (cols - 1).clamp(min=0)),
        ]
    if not points:
        return None
    return torch.cat([r for r, _ in points]), torch.cat([c for _, c in points])


def stencil_gradients(
    spectral_grad: Optional[torch.Tensor], spec: Spectrum
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Coefficient gradient ``K[r_i, c_i]`` and LoCA's location gradient from ``spectral_grad``, ``K`` at
    :func:`stencil_points` (None where there are none).

    The location gradient is the linearised central difference of moving coefficient i by one cell (LoCA's):
    ``dL/dr_i = a_i (K[r_i+1, c_i] - K[r_i-1, c_i]) / 2`` and likewise along columns; neighbour indices are clamped
    at the borders.
    """
    rows = spec.cells[0]
    train_locations = spec.trains_locations
    values = [] if spectral_grad is None else list(spectral_grad.split(rows.numel()))
    coef_grad = values.pop(0).to(spec.coefficients.dtype) if spec.train_coefficients else None
    loc_grad = None
    if train_locations:
        down, up, right, left = values
        half_a = spec.coefficients.detach().to(down.dtype) / 2
        loc_grad = (torch.stack([down - up, right - left]) * half_a).to(spec.locations.dtype)
    elif spec.locations is not None:
        # A zero gradient, never None: DistributedDataParallel expects every trainable parameter to get one.
        loc_grad = torch.zeros_like(spec.locations)
    if coef_grad is None and spec.coefficients.requires_grad:
        coef_grad = torch.zeros_like(spec.coefficients)
    return coef_grad, loc_grad


class _ScatterSpectrum(torch.autograd.Function):
    """The dense M x N spectrum ``S`` with the coefficients at their cells."""

    @staticmethod
    def forward(ctx, coefficients, locations, spec: Spectrum):
        ctx.spec = spec
        s = coefficients.new_zeros(spec.out_features, spec.in_features)
        return s.index_put_((spec.cells[0], spec.cells[1]), coefficients)

    @staticmethod
    def backward(ctx, k):
        points = stencil_points(ctx.spec)
        return (*stencil_gradients(None if points is None else k[points], ctx.spec), None)


def delta_weight(spec: Spectrum) -> torch.Tensor:
    """The dense M x N ``dW`` in float32/float64 (the dense path, and merging)."""
    coefficients = spec.coefficients.to(compute_dtype(spec.coefficients.dtype))
    s = _ScatterSpectrum.apply(coefficients, spec.locations, spec)
    if spec.transform == "dct":  # the columns first: the result is then laid out as the weight it is added to
        dw = idct(idct(s, dim=0), dim=1)
    else:
        dw = torch.fft.ifft2(s).real
    dw = dw * spec.scaling
    if spec.row_order is not None:
        dw = dw.index_select(0, inverse_order(spec.row_order))
    if spec.col_order is not None:
        dw = dw.index_select(1, inverse_order(spec.col_order))
    return dw


def dense_forward(x: torch.Tensor, spec: Spectrum) -> torch.Tensor:
    """``x @ dW^T`` with dW built densely. dW is cast to a half-precision input's dtype (as stock PEFT does), so
    the activations are never copied to float32; its gradient still reaches the float32 coefficients."""
    dw = delta_weight(spec)
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.linear(x, dw.to(x.dtype))
    return F.linear(x.to(dw.dtype), dw).to(x.dtype)
