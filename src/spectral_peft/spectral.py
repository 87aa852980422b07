"""The sparse-spectrum update ``dW = scaling * P_row^T (T_M^T S T_N) P_col^T`` and its two ways of computing.

``S`` is an M x N spectrum with ``n`` non-zero coefficients ``a_i`` at cells ``(r_i, c_i)``; ``T`` is the
orthonormal DCT-II (``transform="dct"``) or the inverse DFT with the real part taken (``"dft"``, FourierFT's
convention: ``dW = scaling * Re(ifft2(S))``); ``P_row``/``P_col`` are optional orderings (S2FT).

* The activation path (training) applies the update to activations: transform the input features, gather the
  ``n`` columns, scale, scatter into ``n`` output frequencies, inverse-transform. No M x N tensor is formed.
* The dense path builds ``dW`` (merging, and forward passes with very few tokens).

Both paths give coefficient gradients and LoCA's finite-difference location gradients from the spectral gradient
``K = dL/dS`` evaluated at each location and its four neighbours: the dense path indexes ``K``, the activation
path gathers it from the transformed input and output gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .transforms import dct, idct

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


# --------------------------------------------------------------------------------------------------------------
# Gradients from the spectral gradient K = dL/dS


def _stencil_gradients(
    spectral_grad_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spec: Spectrum
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Coefficient gradient ``K[r_i, c_i]`` and LoCA's location gradient.

    The location gradient is the linearised central difference of moving coefficient i by one cell:
    ``dL/dr_i = a_i (K[r_i+1, c_i] - K[r_i-1, c_i]) / 2`` and likewise along columns; neighbour indices are clamped
    at the borders.
    """
    rows, cols = spec.cells[0], spec.cells[1]
    coef_grad = None
    if spec.train_coefficients:
        coef_grad = spectral_grad_at(rows, cols).to(spec.coefficients.dtype)
    loc_grad = None
    if spec.locations is not None:
        if spec.train_locations:
            m, n = spec.out_features, spec.in_features
            d_row = spectral_grad_at((rows + 1).clamp(max=m - 1), cols) - spectral_grad_at((rows - 1).clamp(min=0), cols)
            d_col = spectral_grad_at(rows, (cols + 1).clamp(max=n - 1)) - spectral_grad_at(rows, (cols - 1).clamp(min=0))
            half_a = spec.coefficients.detach().to(d_row.dtype) / 2
            loc_grad = (torch.stack([d_row, d_col]) * half_a).to(spec.locations.dtype)
        else:
            # A zero gradient, never None: DistributedDataParallel expects every trainable parameter to get one.
            loc_grad = torch.zeros_like(spec.locations)
    if coef_grad is None and spec.coefficients.requires_grad:
        coef_grad = torch.zeros_like(spec.coefficients)
    return coef_grad, loc_grad


class _SparseSpectralProduct(torch.autograd.Function):
    """``z[t, r_i, :] += a_i * xh[t, c_i, :]``: the spectrum applied to transformed activations.

    ``xh`` is (T, N, C) with C = 1 for the DCT and 2 (real, imaginary) for the DFT. The work is done frequency
    major, on (N, C*T) copies: gathering and scattering whole contiguous rows is several times faster on CPU
    than indexing the middle axis. Only that copy of ``xh`` is saved for backward, never a (T, n) gather.
    """

    @staticmethod
    def forward(ctx, xh, coefficients, locations, spec: Spectrum):
        tokens, n_in, channels = xh.shape
        rows, cols = spec.cells[0], spec.cells[1]
        xt = xh.permute(1, 2, 0).reshape(n_in, channels * tokens)
        contrib = xt.index_select(0, cols) * coefficients.to(xt.dtype)[:, None]
        zt = xt.new_zeros(spec.out_features, channels * tokens).index_add_(0, rows, contrib)
        ctx.save_for_backward(xt)
        ctx.spec, ctx.channels = spec, channels
        return zt.reshape(spec.out_features, channels, tokens).permute(2, 0, 1)

    @staticmethod
    def backward(ctx, gz):
        (xt,) = ctx.saved_tensors
        spec, channels = ctx.spec, ctx.channels
        rows, cols = spec.cells[0], spec.cells[1]
        tokens = gz.shape[0]
        gzt = gz.permute(1, 2, 0).reshape(spec.out_features, channels * tokens)
        gz_rows = gzt.index_select(0, rows)
        grad_xh = None
        if ctx.needs_input_grad[0]:
            a = spec.coefficients.detach().to(gzt.dtype)[:, None]
            grad_xt = torch.zeros_like(xt).index_add_(0, cols, gz_rows * a)
            grad_xh = grad_xt.reshape(spec.in_features, channels, tokens).permute(2, 0, 1)

        def spectral_grad_at(r, c):
            g = gz_rows if r is rows else gzt.index_select(0, r)
            return (g * xt.index_select(0, c)).sum(dim=1)

        coef_grad, loc_grad = _stencil_gradients(spectral_grad_at, spec)
        return grad_xh, coef_grad, loc_grad, None


class _ScatterSpectrum(torch.autograd.Function):
    """The dense M x N spectrum ``S`` with the coefficients at their cells (dense path)."""

    @staticmethod
    def forward(ctx, coefficients, locations, spec: Spectrum):
        ctx.spec = spec
        s = coefficients.new_zeros(spec.out_features, spec.in_features)
        return s.index_put_((spec.cells[0], spec.cells[1]), coefficients)

    @staticmethod
    def backward(ctx, k):
        return (*_stencil_gradients(lambda r, c: k[r, c], ctx.spec), None)


# --------------------------------------------------------------------------------------------------------------
# Transforms on the feature axis


def _analysis(x: torch.Tensor, transform: str) -> torch.Tensor:
    """Features (T, N) -> spectrum (T, N, C)."""
    if transform == "dct":
        return dct(x).unsqueeze(-1)
    return torch.view_as_real(torch.fft.ifft(x, dim=-1).resolve_conj())


def _synthesis(z: torch.Tensor, transform: str) -> torch.Tensor:
    """Spectrum (T, M, C) -> features (T, M)."""
    if transform == "dct":
        return idct(z.squeeze(-1))
    return torch.fft.ifft(torch.view_as_complex(z.contiguous()), dim=-1).real


def _inverse_order(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def apply_delta(x: torch.Tensor, spec: Spectrum) -> torch.Tensor:
    """``x @ dW^T`` through the transforms (activation path); returns the input's dtype."""
    n_in = spec.in_features
    lead = x.shape[:-1]
    if x.numel() == 0:  # an empty batch (torch's FFTs refuse empty input)
        return x.new_zeros(*lead, spec.out_features)
    work = x.reshape(-1, n_in).to(_compute_dtype(x.dtype))
    if spec.col_order is not None:
        work = work.index_select(-1, spec.col_order)
    xh = _analysis(work, spec.transform)
    coefficients = spec.coefficients.to(work.dtype) if spec.coefficients.dtype != work.dtype else spec.coefficients
    z = _SparseSpectralProduct.apply(xh, coefficients, spec.locations, spec)
    y = _synthesis(z, spec.transform) * spec.scaling
    if spec.row_order is not None:
        y = y.index_select(-1, _inverse_order(spec.row_order))
    return y.reshape(*lead, spec.out_features).to(x.dtype)


def delta_weight(spec: Spectrum) -> torch.Tensor:
    """The dense M x N ``dW`` in float32/float64 (dense path and merging)."""
    coefficients = spec.coefficients if spec.coefficients.dtype in (torch.float32, torch.float64) else spec.coefficients.float()
    s = _ScatterSpectrum.apply(coefficients, spec.locations, spec)
    if spec.transform == "dct":
        dw = idct(idct(s, dim=0), dim=1)
    else:
        dw = torch.fft.ifft2(s).real
    dw = dw * spec.scaling
    if spec.row_order is not None:
        dw = dw.index_select(0, _inverse_order(spec.row_order))
    if spec.col_order is not None:
        dw = dw.index_select(1, _inverse_order(spec.col_order))
    return dw


def prefers_dense(tokens: int, spec: Spectrum) -> bool:
    """Whether building dW and multiplying densely beats the transforms on ``tokens`` rows of activations.

    A cost model of one training step (forward and backward), in nanoseconds, fitted to measurements of both
    paths on a 2-core x86 CPU (384 x 384 at 256 and 4096 tokens, 2048 x 2048 at 16 and 256 tokens): the
    activation path costs per token and feature plus per token and coefficient; the dense path costs three
    T x M x N matmuls plus the 2-D transforms that build dW and its spectral gradient. Small square layers with
    many tokens go dense; large layers go through the activations.
    """
    m, n = spec.out_features, spec.in_features
    activation = 41.0 * tokens * (m + n) + 27.0 * tokens * spec.coefficients.numel()
    dense = 0.031 * 3 * tokens * m * n + 9.4 * m * n * (math.log2(max(m, 2)) + math.log2(max(n, 2)))
    return dense < activation


def spectral_forward(x: torch.Tensor, spec: Spectrum) -> torch.Tensor:
    """The adapter's output ``x @ dW^T`` by the cheaper path."""
    tokens = x.numel() // max(spec.in_features, 1)
    if prefers_dense(tokens, spec):
        dw = delta_weight(spec)
        return F.linear(x.to(dw.dtype), dw).to(x.dtype)
    return apply_delta(x, spec)


# --------------------------------------------------------------------------------------------------------------
# Locations


def resolve_moves(old_cells: torch.Tensor, proposed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Accept the proposed cells that stay distinct; a move onto any occupied cell is refused.

    ``old_cells`` (2, n) long are distinct; ``proposed`` (2, n) long are inside the matrix. A moving coefficient may
    not enter a cell that any coefficient held before the move (even one that is leaving it), and among movers
    aiming at the same free cell the lowest index wins. So every refused coefficient can stay where it was and the
    result is always distinct. Deterministic, so every rank of a distributed run makes the same choice.
    """
    width = shape[1]
    old_flat = old_cells[0] * width + old_cells[1]
    new_flat = proposed[0] * width + proposed[1]
    moving = new_flat != old_flat
    accept = moving & ~torch.isin(new_flat, old_flat)
    candidates = torch.nonzero(accept).squeeze(1)
    if candidates.numel() > 1:
        # stable sort by target cell keeps index order within a target: the first of each run wins
        order = torch.sort(new_flat[candidates], stable=True).indices
        sorted_targets = new_flat[candidates][order]
        first = torch.ones_like(sorted_targets, dtype=torch.bool)
        first[1:] = sorted_targets[1:] != sorted_targets[:-1]
        accept[candidates[order[~first]]] = False
    return torch.where(accept, proposed, old_cells)


def random_cells(shape: tuple[int, int], n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` distinct cells drawn uniformly from an M x N matrix, as (2, n) long."""
    m, n_cols = shape
    flat = torch.randperm(m * n_cols, generator=generator)[:n]
    return torch.stack([flat // n_cols, flat % n_cols])


def check_cells(cells: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    """Raise if ``cells`` (2, n) are not integral, inside ``shape`` or distinct."""
    if cells.dim() != 2 or cells.shape[0] != 2:
        raise ValueError(f"{what}: locations must have shape (2, n), got {tuple(cells.shape)}")
    if cells.is_floating_point():
        if not torch.isfinite(cells).all():
            raise ValueError(f"{what}: locations contain NaN or Inf")
        cells = cells.round()
    m, n = shape
    rows, cols = cells[0], cells[1]
    if rows.numel() and (rows.min() < 0 or rows.max() > m - 1 or cols.min() < 0 or cols.max() > n - 1):
        raise ValueError(
            f"{what}: locations fall outside the {m} x {n} matrix "
            f"(rows {int(rows.min())}..{int(rows.max())}, columns {int(cols.min())}..{int(cols.max())})"
        )
    flat = rows.long() * n + cols.long()
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError(f"{what}: {flat.numel() - torch.unique(flat).numel()} locations share a cell with another")


def check_permutation(order: torch.Tensor, size: int, what: str) -> None:
    """Raise unless ``order`` is a permutation of ``range(size)``."""
    if order.dim() != 1 or order.numel() != size:
        raise ValueError(f"{what}: expected a permutation of {size} indices, got shape {tuple(order.shape)}")
    if order.is_floating_point() or order.is_complex():
        raise ValueError(f"{what}: expected integer indices, got {order.dtype}")
    seen = torch.zeros(size, dtype=torch.bool, device=order.device)
    if order.numel() and (order.min() < 0 or order.max() >= size):
        raise ValueError(f"{what}: indices outside 0..{size - 1}")
    seen[order.long()] = True
    if not seen.all():
        raise ValueError(f"{what}: not a permutation ({int((~seen).sum())} indices missing, some repeated)")
