"""Moving LoCA's coefficients between cells: a move is taken only where it keeps every cell distinct."""

from __future__ import annotations

import torch


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
