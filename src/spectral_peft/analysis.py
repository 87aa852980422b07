"""Measures of how sparse a matrix's spectrum is."""

from __future__ import annotations

from typing import Optional

import torch

from .spectral import check_permutation
from .transforms import COMPUTE_DTYPES, dct


def transform_2d(matrix: torch.Tensor, transform: str = "dct") -> torch.Tensor:
    """Orthonormal 2-D transform of a matrix (DCT-II on both axes, or the unitary DFT), in float32 or float64."""
    work = matrix if matrix.dtype in COMPUTE_DTYPES else matrix.float()
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


def power_spectrum(
    matrix: torch.Tensor,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``|coefficient|^2`` of the orthonormal 2-D transform of the (reordered) matrix, same shape as ``matrix``."""
    if matrix.dim() != 2:
        raise ValueError(f"a 2-D matrix is needed, got shape {tuple(matrix.shape)}")
    return transform_2d(permute(matrix, row_order, col_order), transform).abs().pow(2)


def energy_shares(
    matrix: torch.Tensor,
    ks,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> list[float]:
    """:func:`spectral_energy` for several ``k`` from one transform (the power sorted once)."""
    for k in ks:
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"spectral_energy: k must be a non-negative integer, got {k!r}")
    cumulative = cumulative_shares(power_spectrum(matrix, transform, row_order, col_order))
    return [float(cumulative[min(k, cumulative.numel()) - 1]) if k else 0.0 for k in ks]


def cumulative_shares(power: torch.Tensor) -> torch.Tensor:
    """Entry ``k - 1``: the share of the total held by the ``k`` largest entries of ``power`` (zeros if all zero)."""
    power = power.flatten()
    total = power.sum()
    if total == 0:
        return torch.zeros_like(power)
    return torch.sort(power, descending=True).values.cumsum(0) / total


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
    return energy_shares(matrix, [k], transform, row_order, col_order)[0]


def spectral_flatness(
    matrix: torch.Tensor,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> float:
    """Geometric over arithmetic mean of the power spectrum: 1 for a perfectly flat spectrum, 0 when any
    coefficient is exactly zero. For reference, i.i.d. Gaussian entries give about exp(-gamma)/2 = 0.28 with the
    DCT (each power is chi-squared with 1 degree of freedom) and exp(-gamma) = 0.56 with the DFT (2 degrees)."""
    return flatness_of(power_spectrum(matrix.double(), transform, row_order, col_order))


def flatness_of(power: torch.Tensor) -> float:
    """Geometric over arithmetic mean of the entries of a power spectrum (0 when all are zero)."""
    power = power.double().flatten()
    mean = power.mean()
    if mean == 0:
        return 0.0
    return float(torch.exp(torch.log(power / mean).mean()))
