"""resolve_moves: LoCA's moves are taken only where every cell stays distinct."""

from __future__ import annotations

import pytest
import torch

from spectral_peft.loca.locations import resolve_moves
from spectral_peft.spectral import (
    random_cells,
)

from ..spectral.reference import flat_cells

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resolve_moves_move_to_free_cell_accepted():
    old = torch.tensor([[0, 1], [0, 1]])
    proposed = torch.tensor([[2, 1], [2, 1]])
    assert torch.equal(resolve_moves(old, proposed, (3, 3)), proposed)


def test_resolve_moves_onto_occupied_cell_stays():
    old = torch.tensor([[0, 1, 2], [0, 1, 2]])
    proposed = torch.tensor([[1, 1, 0], [1, 1, 2]])  # 0 aims at 1's cell (1 stays); 2 moves to free (0, 2)
    result = resolve_moves(old, proposed, (3, 3))
    assert torch.equal(result, torch.tensor([[0, 1, 0], [0, 1, 2]]))


def test_resolve_moves_onto_cell_being_vacated_is_refused():
    old = torch.tensor([[0, 1], [0, 1]])
    proposed = torch.tensor([[1, 2], [1, 2]])  # 0 aims at 1's old cell while 1 leaves it
    result = resolve_moves(old, proposed, (3, 3))
    assert torch.equal(result, torch.tensor([[0, 2], [0, 2]]))


def test_resolve_moves_swap_is_refused():
    old = torch.tensor([[0, 1], [0, 1]])
    proposed = torch.tensor([[1, 0], [1, 0]])
    assert torch.equal(resolve_moves(old, proposed, (3, 3)), old)


def test_resolve_moves_lowest_index_wins_a_free_cell():
    old = torch.tensor([[0, 4, 1, 3], [0, 4, 3, 1]])
    target = (2, 2)
    proposed = torch.tensor([[3, 2, 2, 2], [1, 2, 2, 2]])  # 0 stays; 1, 2 and 3 all aim at (2, 2)
    result = resolve_moves(old, proposed, (5, 5))
    assert result[:, 1].tolist() == list(target)
    assert torch.equal(result[:, [0, 2, 3]], old[:, [0, 2, 3]])
    # with the order of the contenders reversed, the lowest index still wins
    proposed2 = torch.tensor([[0, 4, 2, 2], [0, 4, 2, 2]])  # 2 and 3 aim at (2, 2)
    result2 = resolve_moves(old, proposed2, (5, 5))
    assert result2[:, 2].tolist() == list(target)
    assert result2[:, 3].tolist() == old[:, 3].tolist()


def test_resolve_moves_property_random():
    generator = torch.Generator().manual_seed(123)
    for trial in range(300):
        m = int(torch.randint(1, 7, (1,), generator=generator))
        n = int(torch.randint(1, 7, (1,), generator=generator))
        k = int(torch.randint(1, m * n + 1, (1,), generator=generator))
        old = random_cells((m, n), k, generator)
        proposed = old.clone()
        move = torch.rand(k, generator=generator) < 0.6
        # small moves (crowded: many collisions) or anywhere
        if trial % 2:
            proposed[0] = torch.where(move, (old[0] + torch.randint(-1, 2, (k,), generator=generator)).clamp(0, m - 1), old[0])
            proposed[1] = torch.where(move, (old[1] + torch.randint(-1, 2, (k,), generator=generator)).clamp(0, n - 1), old[1])
        else:
            proposed[0] = torch.where(move, torch.randint(0, m, (k,), generator=generator), old[0])
            proposed[1] = torch.where(move, torch.randint(0, n, (k,), generator=generator), old[1])
        result = resolve_moves(old, proposed, (m, n))

        assert result.shape == old.shape and result.dtype == old.dtype
        old_flat, prop_flat, res_flat = flat_cells(old, n), flat_cells(proposed, n), flat_cells(result, n)
        assert len(set(res_flat)) == k, "result not distinct"
        accepted = [i for i in range(k) if res_flat[i] != old_flat[i]]
        for i in range(k):
            # each coefficient either stays or goes exactly where it proposed
            assert res_flat[i] in (old_flat[i], prop_flat[i])
        occupied = set(old_flat)
        for i in accepted:
            assert res_flat[i] not in occupied, "moved onto a previously occupied cell"
        accepted_targets = [res_flat[i] for i in accepted]
        assert len(set(accepted_targets)) == len(accepted_targets)
        # a free target is taken by the lowest-index contender, and some contender always gets it
        for cell in set(prop_flat) - occupied:
            contenders = [i for i in range(k) if prop_flat[i] == cell]
            winners = [i for i in range(k) if res_flat[i] == cell and old_flat[i] != cell]
            assert winners == [min(contenders)]
        # a target that was occupied is never entered
        for i in range(k):
            if prop_flat[i] != old_flat[i] and prop_flat[i] in occupied:
                assert res_flat[i] == old_flat[i]


def test_resolve_moves_no_moves_is_identity():
    old = random_cells((10, 10), 30, torch.Generator().manual_seed(0))
    assert torch.equal(resolve_moves(old, old.clone(), (10, 10)), old)
