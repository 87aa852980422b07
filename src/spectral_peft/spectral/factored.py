"""The factored path: ``dW`` as a product of the coefficients' basis vectors, as thin as their number.

``dW = P_row^T (T_M^T S T_N) P_col^T`` is the sum over coefficients of ``a_i u_i v_i^T``, ``u_i`` being row ``r_i`` of
``T_M`` (a column of the inverse transform) with its entries put in S2FT's row order, ``v_i`` likewise for ``c_i``.
With ``U = [u_i]`` (M x n) and ``V = [v_i]`` (N x n), ``x @ dW^T = ((x @ V) * a) @ U^T``: two thin matrix products,
LoRA's of rank n, and ``K = dL/dS`` at a point (r, c) is the sum over tokens of ``(g @ u_r)(x @ v_c)``. The DFT's
basis vector is a cosine and a sine: ``Re(e^{i alpha} e^{i beta}) = cos cos - sin sin``, so it takes two columns per
coefficient. On a GPU this is a handful of kernels where the dense path runs the 2-D transforms over M x N.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..transforms import dct_scale, inverse_order
from .cache import placement_of
from .spectrum import Spectrum, compute_dtype, stencil_gradients, stencil_points


def _basis(size: int, frequencies: torch.Tensor, order: Optional[torch.Tensor], transform: str,
           dtype: torch.dtype, conjugate: bool = False) -> torch.Tensor:
    """The basis vectors of ``frequencies`` as columns: (size, k) for the DCT, (size, 2k) cosines then sines for the
    DFT (``conjugate``: the sines negated, the input side's); rows in ``order``'s positions (S2FT)."""
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    device = frequencies.device
    positions = torch.arange(size, device=device) if order is None else inverse_order(order.to(device))
    if transform == "dct":
        scale = dct_scale(size).to(device=device, dtype=angle_dtype)
        # the angle pi f (2p + 1) / (2 size), reduced exactly in integers before it becomes a float
        phase = torch.remainder(frequencies[None, :] * (2 * positions + 1)[:, None], 4 * size).to(angle_dtype)
        return torch.cos(phase.mul_(math.pi / (2 * size))).mul_(scale[frequencies]).to(dtype)
    if conjugate:
        frequencies = (size - frequencies) % size
    angle = torch.remainder(frequencies[None, :] * positions[:, None], size).to(angle_dtype).mul_(2 * math.pi / size)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).to(dtype)


def _out_basis(spec: Spectrum, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _basis(spec.out_features, rows, spec.row_order, spec.transform, dtype)


def _in_basis(spec: Spectrum, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _basis(spec.in_features, cols, spec.col_order, spec.transform, dtype, conjugate=True)


def _bases(spec: Spectrum, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The basis vectors of the cells, output side (M, k) and input side (N, k); kept with the placement, since
    building them is a dozen small kernels per side, more than the thin products themselves cost on a GPU."""
    return placement_of(spec).get(("bases", dtype), lambda: (_out_basis(spec, spec.cells[0], dtype),
                                                              _in_basis(spec, spec.cells[1], dtype)))


def _column_scale(spec: Spectrum) -> float:
    # ifft2's 1 / (M N) for the DFT (FourierFT's convention); the DCT's basis is orthonormal
    return spec.scaling / (spec.out_features * spec.in_features) if spec.transform == "dft" else spec.scaling


def _basis_dots(left: torch.Tensor, right: torch.Tensor, points: int) -> torch.Tensor:
    """Sum over tokens of ``left * right`` per column, in float32 at least; a DFT point's two columns added."""
    dots = (left.to(compute_dtype(left.dtype)) * right.to(compute_dtype(right.dtype))).sum(0)
    return dots if dots.numel() == points else dots[:points] + dots[points:]


class _FactoredProduct(torch.autograd.Function):
    """``x @ dW^T`` for x of shape (T, N) as ``((x @ V) * a) @ U^T``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, coefficients, locations, spec: Spectrum):
        out_basis, in_basis = _bases(spec, x.dtype)
        weights = coefficients.detach().to(x.dtype) * _column_scale(spec)
        if spec.transform == "dft":
            weights = torch.cat([weights, weights])
        projected = x @ in_basis
        # the input only for LoCA's location phase (its neighbours' projections): the base layer's own product,
        # whose weight is frozen, does not keep it either
        ctx.save_for_backward(x if spec.trains_locations else None, projected,
                              out_basis, in_basis, weights)
        ctx.spec = spec
        return (projected * weights) @ out_basis.t()

    @staticmethod
    def backward(ctx, grad_y):
        x, projected, out_basis, in_basis, weights = ctx.saved_tensors
        spec = ctx.spec
        grad_y = grad_y.reshape(-1, spec.out_features).to(out_basis.dtype)  # under autocast it may differ
        grad_projected = grad_y @ out_basis
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_projected * weights) @ in_basis.t()
        points = stencil_points(spec)
        spectral_grad = None
        if points is not None:
            count = points[0].numel()
            if count == spec.cells.shape[1]:  # the cells alone: both projections are at hand
                dots = _basis_dots(grad_projected, projected, count)
            else:  # LoCA's location phase: every neighbour's basis vector too
                dots = _basis_dots(grad_y @ _out_basis(spec, points[0], grad_y.dtype),
                                   x @ _in_basis(spec, points[1], x.dtype), count)
            spectral_grad = dots * _column_scale(spec)
        coef_grad, loc_grad = stencil_gradients(spectral_grad, spec)
        return grad_x, coef_grad, loc_grad, None


def factored_forward(x: torch.Tensor, spec: Spectrum) -> torch.Tensor:
    """``x @ dW^T`` through the coefficients' basis vectors (factored path), in the input's dtype (half-precision
    inputs are multiplied in their own dtype, as LoRA's are)."""
    lead = x.shape[:-1]
    work = x.reshape(-1, spec.in_features)
    if work.dtype not in (torch.float16, torch.bfloat16):
        work = work.to(compute_dtype(work.dtype))
    y = _FactoredProduct.apply(work, spec.coefficients, spec.locations, spec)
    return y.reshape(*lead, spec.out_features).to(x.dtype)
