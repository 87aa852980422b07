"""What the paths keep between calls: placements rebuilt when cells or orders change, kept tensors that serve
training after a pass under inference_mode, and nothing carried into a copy."""

from __future__ import annotations

import pytest
import torch

from spectral_peft import spectral
from spectral_peft.spectral import (
    DELTA_PRODUCTS,
    apply_delta,
    random_cells,
)
from spectral_peft.spectral.cache import Placement, PlacementCache, Workspace

from .reference import (
    make_spec,
    ref_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept(spec):
    """``spec`` with a kept placement, as a layer gives it (a PlacementCache entry for adapter "a")."""
    cache = PlacementCache()
    spec.placement = cache("a", spec)
    return cache


def test_cell_structure_follows_cells_moved_in_place():
    # Q's sparsity is kept with the placement between calls: moving the cells (in place, as LoCA does) rebuilds it
    spec = make_spec(7, 9, n_coef=6, dtype=torch.float64, seed=4)
    cache = _kept(spec)
    x = torch.randn(5, 9, dtype=torch.float64)
    first = apply_delta(x, spec)
    assert ("structure", torch.float64) in spec.placement._built
    moved = random_cells((7, 9), 6, torch.Generator().manual_seed(99))
    assert not torch.equal(moved, spec.cells)
    spec.cells.copy_(moved)
    assert not spec.placement.serves(spec)
    spec.placement = cache("a", spec)
    second = apply_delta(x, spec)
    torch.testing.assert_close(second, x @ ref_of(spec).T, atol=1e-10, rtol=1e-8)
    assert (second - first).abs().max() > 1e-3
    second.sum().backward()  # the coefficient gradient reads the new cells' stencil
    coefficients = spec.coefficients.detach().clone().requires_grad_(True)
    (x @ ref_of(spec, coefficients).T).sum().backward()
    torch.testing.assert_close(spec.coefficients.grad, coefficients.grad, atol=1e-10, rtol=1e-8)


def _gradients(x, spec, product):
    spec.coefficients.grad = spec.locations.grad = None
    (product(x, spec).sin()).sum().backward()
    return [None if g is None else g.clone() for g in (spec.coefficients.grad, spec.locations.grad)]


def test_gradient_stencils_are_kept_per_phase_and_follow_moved_cells():
    # the activation path keeps the stencil of each choice of what trains (coefficients, locations, both) with
    # the placement: switching phases, and moving the cells, must each give the dense path's gradients
    spec = make_spec(7, 9, n_coef=6, dtype=torch.float64, locations=True, seed=5)
    cache = _kept(spec)
    x = torch.randn(40, 9, dtype=torch.float64)
    phases = [(True, False), (False, True), (True, True), (True, False), (False, True)]
    for moved in (False, True):
        if moved:
            spec.cells.copy_(random_cells((7, 9), 6, torch.Generator().manual_seed(98)))
            spec.placement = cache("a", spec)
        for spec.train_coefficients, spec.train_locations in phases:
            kept = _gradients(x, spec, apply_delta)
            assert spec.placement.get(("structure", x.dtype), lambda: None)._stencils.keys() <= set(phases)
            dense = _gradients(x, spec, spectral.DELTA_PRODUCTS["dense"])
            for got, want in zip(kept, dense):
                torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    structure = spec.placement.get(("structure", x.dtype), lambda: None)
    assert len(structure._stencils) == 3  # one per phase, built once each since the cells moved


def test_activation_path_reorders_follow_orders_set_in_place_or_replaced():
    # S2FT's composed reorders are kept with the placement: new orders, copied in place (as set_orders and loading
    # do) or given as new tensors, must be used while the cells stay put
    spec = make_spec(7, 9, n_coef=6, dtype=torch.float64, orders=True, seed=8)
    cache = _kept(spec)
    x = torch.randn(5, 9, dtype=torch.float64)
    first = apply_delta(x, spec)
    assert ("reorders", x.device) in spec.placement._built
    spec.row_order.copy_(torch.randperm(7, generator=torch.Generator().manual_seed(5)))
    spec.placement = cache("a", spec)
    in_place = apply_delta(x, spec)
    torch.testing.assert_close(in_place, x @ ref_of(spec).T, atol=1e-10, rtol=1e-8)
    assert (in_place - first).abs().max() > 1e-3
    spec.col_order = torch.randperm(9, generator=torch.Generator().manual_seed(6))
    spec.placement = cache("a", spec)
    replaced = apply_delta(x, spec)
    torch.testing.assert_close(replaced, x @ ref_of(spec).T, atol=1e-10, rtol=1e-8)
    assert (replaced - in_place).abs().max() > 1e-3


def test_a_placement_serves_only_the_cells_and_orders_it_was_built_for():
    spec = make_spec(7, 9, n_coef=6, orders=True, seed=8)
    placement = Placement(spec)
    assert placement.serves(spec)
    for name in ("cells", "row_order", "col_order"):
        other = make_spec(7, 9, n_coef=6, orders=True, seed=8)
        other.cells, other.row_order, other.col_order = spec.cells, spec.row_order, spec.col_order
        setattr(other, name, getattr(spec, name).clone())  # equal values, another tensor
        assert not placement.serves(other), name
        getattr(spec, name).add_(0)  # the same tensor written in place
        assert not placement.serves(spec), name
        placement = Placement(spec)


@pytest.mark.parametrize("path", ["activation", "factored"])
@pytest.mark.parametrize("orders", [False, True])
def test_what_is_kept_from_a_call_under_inference_mode_serves_training(orders, path):
    # the first call of a layer may come under torch.inference_mode (evaluation before training): the kept
    # structure, reorders, bases and scratch buffers must still serve training afterwards, in the same thread
    spec = make_spec(7, 9, n_coef=6, dtype=torch.float64, orders=orders, seed=6)
    _kept(spec)
    spec.workspace = Workspace()
    product = DELTA_PRODUCTS[path]
    with torch.inference_mode():
        product(torch.randn(300, 9, dtype=torch.float64), spec)
    x = torch.randn(300, 9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(300, 7, dtype=torch.float64)
    (product(x, spec) * r).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    coefficients = spec.coefficients.detach().clone().requires_grad_(True)
    ((x_ref @ ref_of(spec, coefficients).T) * r).sum().backward()
    assert coefficients.grad.abs().max() > 1e-3
    torch.testing.assert_close(spec.coefficients.grad, coefficients.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("orders", [False, True])
def test_factored_bases_follow_moved_cells_and_new_orders(orders):
    # the basis vectors are kept with the placement: moving the cells in place (LoCA) or setting new orders in place
    # (S2FT) must rebuild them
    spec = make_spec(7, 9, n_coef=6, dtype=torch.float64, orders=orders, seed=6)
    cache = _kept(spec)
    x = torch.randn(4, 9, dtype=torch.float64)
    spectral.factored_forward(x, spec)
    assert ("bases", torch.float64) in spec.placement._built
    spec.cells.copy_(random_cells((7, 9), 6, torch.Generator().manual_seed(99)))
    if orders:
        spec.row_order.copy_(torch.randperm(7, generator=torch.Generator().manual_seed(5)))
    spec.placement = cache("a", spec)
    xx = x.clone().requires_grad_(True)
    r = torch.randn(4, 7, dtype=torch.float64)
    (spectral.factored_forward(xx, spec) * r).sum().backward()
    x_ref = x.clone().requires_grad_(True)
    coefficients = spec.coefficients.detach().clone().requires_grad_(True)
    ((x_ref @ ref_of(spec, coefficients).T) * r).sum().backward()
    assert coefficients.grad.abs().max() > 1e-3
    torch.testing.assert_close(spec.coefficients.grad, coefficients.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(xx.grad, x_ref.grad, atol=1e-10, rtol=1e-8)


def test_a_copied_or_pickled_layer_keeps_nothing_of_the_original():
    import copy
    import pickle

    cache, workspace = PlacementCache(), Workspace()
    spec = make_spec(6, 9)
    cache("a", spec)
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert copied._placements == {}
    for copied in (copy.deepcopy(workspace), pickle.loads(pickle.dumps(workspace))):
        assert isinstance(copied, Workspace) and copied is not workspace


def test_scratch_keeps_one_contiguous_buffer_per_use_whatever_the_batch(monkeypatch):
    # a block's rows vary with the batch (padding to each batch's longest input) and layers of different widths
    # alternate: the thread's scratch keeps one buffer per use, grown to the largest, and hands out contiguous views
    from spectral_peft.spectral import activation

    monkeypatch.setattr(activation, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(activation, "_BLOCK_MIN_ROWS", 16)
    workspace = Workspace()
    specs = [make_spec(m, n, n_coef=6, dtype=torch.float64, seed=m) for m, n in ((7, 9), (12, 5))]
    for spec in specs:
        spec.workspace = workspace
    counts = []
    for tokens in (51, 3, 17, 40, 33, 16, 50):
        for spec in specs:
            x = torch.randn(tokens, spec.in_features, dtype=torch.float64, requires_grad=True)
            y = apply_delta(x, spec)
            torch.testing.assert_close(y, x.detach() @ ref_of(spec).T, atol=1e-10, rtol=1e-8)
            y.sum().backward()
        counts.append(len(workspace.scratch(torch.device("cpu")).buffers))
    assert counts == counts[:1] * len(counts)  # one per use, however many sizes were asked for after the first
    view = workspace.scratch(torch.device("cpu"))("product", 5, 3, torch.float64)
    assert view.shape == (5, 3) and view.is_contiguous()
