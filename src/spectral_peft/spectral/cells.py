"""Drawing and checking coefficient cells and orderings."""

from __future__ import annotations

import zlib
from typing import Optional

import torch


def random_cells(shape: tuple[int, int], n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` distinct cells drawn uniformly from an M x N matrix, as (2, n) long."""
    m, n_cols = shape
    flat = torch.randperm(m * n_cols, generator=generator)[:n]
    return torch.stack([flat // n_cols, flat % n_cols])


def module_generator(seed: int, module_name: str) -> torch.Generator:
    """A generator seeded by ``seed`` mixed with a module's name: a different draw per module, reproducible from
    the one seed on every rank and rerun."""
    return torch.Generator().manual_seed(seed ^ zlib.crc32(module_name.encode()))


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
