"""Drawing and checking cells."""

from __future__ import annotations

import pytest
import torch

from spectral_peft.spectral import (
    check_cells,
    random_cells,
)

from .reference import flat_cells

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape,n", [((1, 1), 1), ((3, 4), 12), ((3, 4), 5), ((64, 48), 1000), ((1, 50), 20), ((50, 1), 20)])
def test_random_cells_distinct_and_in_range(shape, n):
    cells = random_cells(shape, n, torch.Generator().manual_seed(n))
    assert cells.shape == (2, n)
    assert cells.dtype == torch.long
    assert int(cells[0].min()) >= 0 and int(cells[0].max()) < shape[0]
    assert int(cells[1].min()) >= 0 and int(cells[1].max()) < shape[1]
    assert len(set(flat_cells(cells, shape[1]))) == n
    check_cells(cells, shape, "test")


def test_random_cells_reproducible_and_covering():
    a = random_cells((8, 8), 64, torch.Generator().manual_seed(5))
    b = random_cells((8, 8), 64, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert sorted(flat_cells(a, 8)) == list(range(64))


def test_random_cells_uses_both_axes():
    # rows and columns both vary (e.g. not all in row 0 from a flat/width mix-up)
    cells = random_cells((20, 30), 100, torch.Generator().manual_seed(1))
    assert cells[0].unique().numel() > 10 and cells[1].unique().numel() > 10


@pytest.mark.parametrize(
    "cells",
    [
        torch.tensor([[0, 3], [0, 1]]),  # row out of range (3 x 4)
        torch.tensor([[0, 1], [0, 4]]),  # column out of range
        torch.tensor([[-1, 1], [0, 1]]),  # negative row
        torch.tensor([[0, 1], [-1, 1]]),  # negative column
        torch.tensor([[1, 1], [2, 2]]),  # duplicate
        torch.tensor([[1.0, 1.2], [2.0, 1.9]]),  # duplicate after rounding
        torch.tensor([[0.0, float("nan")], [0.0, 1.0]]),  # NaN
        torch.tensor([[0.0, float("inf")], [0.0, 1.0]]),  # Inf
        torch.tensor([[2.6, 0.0], [0.0, 1.0]]),  # rounds to row 3, out of range
        torch.tensor([0, 1, 2]),  # wrong shape (1-D)
        torch.tensor([[0, 1], [0, 1], [0, 1]]),  # wrong shape (3, n)
        torch.zeros(2, 2, 1, dtype=torch.long),  # wrong shape (3-D)
    ],
)
def test_check_cells_rejects(cells):
    with pytest.raises(ValueError):
        check_cells(cells, (3, 4), "test")


@pytest.mark.parametrize(
    "cells",
    [torch.tensor([[0, 2, 1], [0, 3, 3]]), torch.tensor([[0.0, 2.2, 0.6], [0.0, 2.9, 3.4]]), torch.zeros(2, 0, dtype=torch.long)],
)
def test_check_cells_accepts(cells):
    check_cells(cells, (3, 4), "test")
