"""An explicit dense reference for the spectral update, dW = scaling * P_row^T (T_M^T S T_N) P_col^T, built
from the orthonormal DCT-II matrix by its formula, so nothing here trusts the package's own transforms; and
``make_spec``, a random spectrum to test with."""

from __future__ import annotations

import math

import torch

from spectral_peft.spectral import (
    DELTA_PRODUCTS,
    Spectrum,
    random_cells,
)

PATHS = sorted(DELTA_PRODUCTS)  # activation, dense, factored


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II: T[k, j] = c_k cos(pi (2j + 1) k / (2n))."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    t = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    t[0] = t[0] / math.sqrt(2.0)
    return t.to(dtype)


def dense_spectrum(coefficients: torch.Tensor, cells: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """S with the coefficients at their cells (differentiable in the coefficients)."""
    s = torch.zeros(m, n, dtype=coefficients.dtype)
    return s.index_put((cells[0].long(), cells[1].long()), coefficients, accumulate=True)


def reference_dw(
    coefficients, cells, m, n, scaling, transform="dct", row_order=None, col_order=None
) -> torch.Tensor:
    s = dense_spectrum(coefficients, cells, m, n)
    if transform == "dct":
        dw = scaling * dct_matrix(m, s.dtype).T @ s @ dct_matrix(n, s.dtype)
    else:
        dw = scaling * torch.fft.ifft2(s.to(torch.complex128)).real.to(s.dtype)
    if row_order is not None or col_order is not None:
        row_order = torch.arange(m) if row_order is None else row_order
        col_order = torch.arange(n) if col_order is None else col_order
        full = torch.empty_like(dw)
        # dW_full[row_order[i], col_order[j]] = dW_perm[i, j]
        full[row_order[:, None], col_order[None, :]] = dw
        dw = full
    return dw


def make_spec(
    m=6, n=9, n_coef=7, scaling=1.7, transform="dct", dtype=torch.float32, seed=0, orders=False,
    locations=False, cells=None, train_coefficients=True, train_locations=None,
) -> Spectrum:
    generator = torch.Generator().manual_seed(seed)
    if cells is None:
        cells = random_cells((m, n), n_coef, generator)
    n_coef = cells.shape[1]
    coefficients = torch.randn(n_coef, generator=generator).to(dtype).requires_grad_(True)
    row_order = col_order = None
    if orders:
        row_order = torch.randperm(m, generator=generator)
        col_order = torch.randperm(n, generator=generator)
    loc = cells.to(dtype).clone().requires_grad_(True) if locations else None
    return Spectrum(
        coefficients=coefficients, cells=cells, out_features=m, in_features=n, scaling=scaling,
        transform=transform, row_order=row_order, col_order=col_order, locations=loc,
        train_coefficients=train_coefficients,
        train_locations=bool(locations) if train_locations is None else train_locations,
    )


def ref_of(spec: Spectrum, coefficients=None) -> torch.Tensor:
    coefficients = spec.coefficients if coefficients is None else coefficients
    return reference_dw(
        coefficients, spec.cells, spec.out_features, spec.in_features, spec.scaling, spec.transform,
        spec.row_order, spec.col_order,
    )


SHAPES = [(6, 9), (8, 8), (12, 5), (1, 7), (7, 1), (16, 24)]


def _atol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-10


def flat_cells(cells, width: int) -> list[int]:
    """Cells (2, n) as flat indices ``row * width + col``."""
    return (cells[0] * width + cells[1]).tolist()

