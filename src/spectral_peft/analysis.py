"""Measures of how sparse a matrix's spectrum is."""

from __future__ import annotations

from typing import Optional

import torch

from .spectral import check_permutation
from .transforms import dct


def transform_2d(matrix: torch.Tensor, transform: str = "dct") -> torch.Tensor:
    """Orthonormal 2-D transform of a matrix (DCT-II on both axes, or the unitary DFT), in float32 or float64."""
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    if transform == "dct":
        return dct(dct(work, dim=0), dim=1)
    if transform == "dft":
        return torch.fft.fft2(work, norm="ortho")
    raise ValueError(f"transform must be 'dct' or 'dft', got {transform!r}")


def permute(matrix: torch.Tensor, row_order: Optional[torch.Tensor] = None, col_order: Optional[torch.Tensor] = None):
    """``matrix[row_order][:, col_order]`` (either order may be None; each must be a permutation)."""
    for what, order, size in (("row_order", row_order, matrix.shape[0]), ("col_order", col_order, matrix.shape[-1])):
        if order is not None:
            check_permutation(order, size, what)
    if row_order is not None:
        matrix = matrix.index_select(0, row_order.to(matrix.device))
    if col_order is not None:
        matrix = matrix.index_select(1, col_order.to(matrix.device))
    return matrix


def spectral_energy(
    matrix: torch.Tensor,
    k: int,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> float:
    """Share of the squared Frobenius norm held by the ``k`` largest-magnitude coefficients of the orthonormal
    2-D transform of ``matrix`` (rows and columns first reordered by ``row_order``/``col_order``)."""
    if matrix.dim() != 2:
        raise ValueError(f"spectral_energy needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"spectral_energy: k must be a non-negative integer, got {k!r}")
    power = transform_2d(permute(matrix, row_order, col_order), transform).abs().pow(2).flatten()
    total = power.sum()
    if total == 0:
        return 0.0
    k = min(k, power.numel())
    return float(torch.topk(power, k).values.sum() / total) if k else 0.0
