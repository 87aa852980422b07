"""The dense dW, the coefficient and input gradients of every path, and LoCA's finite-difference location
gradient, against the explicit dense reference (exact cases); phases that freeze a part."""

from __future__ import annotations

import math

import pytest
import torch

from spectral_peft.spectral import (
    DELTA_PRODUCTS,
    Spectrum,
    apply_delta,
    delta_weight,
    dense_forward,
)

from .reference import (
    PATHS,
    SHAPES,
    _atol,
    dct_matrix,
    make_spec,
    ref_of,
    reference_dw,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_dct_matrix_is_orthonormal_and_cosine():
    t = dct_matrix(7)
    torch.testing.assert_close(t @ t.T, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(t[0, 3].item() - 1 / math.sqrt(7)) < 1e-12
    assert abs(t[2, 1].item() - math.sqrt(2 / 7) * math.cos(math.pi * 3 * 2 / 14)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("orders", [False, True])
def test_delta_weight_and_apply_delta_match_dense_reference(dtype, shape, transform, orders):
    m, n = shape
    spec = make_spec(m, n, n_coef=min(7, m * n), transform=transform, dtype=dtype, orders=orders, seed=m * 31 + n)
    expected = ref_of(spec)
    dw = delta_weight(spec)
    assert dw.shape == (m, n)
    assert dw.dtype == dtype
    assert expected.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(dw, expected, atol=_atol(dtype), rtol=0)

    x = torch.randn(2, 3, n, dtype=dtype)
    y = apply_delta(x, spec)
    assert y.shape == (2, 3, m)
    assert y.dtype == dtype
    torch.testing.assert_close(y, x @ expected.T, atol=_atol(dtype), rtol=0)
    torch.testing.assert_close(dense_forward(x, spec), x @ expected.T, atol=_atol(dtype), rtol=0)


def test_permutations_are_not_trivially_identity():
    # the orders really change dW (a test with orders that happened to be the identity would prove nothing)
    spec = make_spec(8, 10, n_coef=9, orders=True, seed=5)
    plain = make_spec(8, 10, n_coef=9, orders=False, seed=5)
    assert not torch.equal(spec.row_order, torch.arange(8)) and not torch.equal(spec.col_order, torch.arange(10))
    dw, dw_plain = delta_weight(spec), delta_weight(plain)
    assert (dw - dw_plain).abs().max() > 1e-3
    torch.testing.assert_close(
        dw[spec.row_order][:, spec.col_order], reference_dw(plain.coefficients, plain.cells, 8, 10, plain.scaling),
        atol=1e-5, rtol=0,
    )


def test_dft_reference_is_fourierft_convention():
    # one coefficient at (r, c): Re(ifft2) is a * cos(2 pi (r i / M + c j / N)) / (M N)
    m, n, r, c, a = 6, 5, 2, 3, 1.3
    spec = Spectrum(
        coefficients=torch.tensor([a], dtype=torch.float64), cells=torch.tensor([[r], [c]]), out_features=m,
        in_features=n, scaling=2.0, transform="dft",
    )
    i = torch.arange(m, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    expected = 2.0 * a * torch.cos(2 * math.pi * (r * i / m + c * j / n)) / (m * n)
    torch.testing.assert_close(delta_weight(spec), expected, atol=1e-12, rtol=0)
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(apply_delta(x, spec), x @ expected.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 9), (12, 5), (8, 8)])
@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("orders", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_coefficient_and_input_gradients_match_reference(dtype, shape, transform, orders, path):
    m, n = shape
    spec = make_spec(m, n, n_coef=8, transform=transform, dtype=dtype, orders=orders, seed=m + 3 * n)
    x = torch.randn(3, 4, n, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 4, m, dtype=dtype)

    y = DELTA_PRODUCTS[path](x, spec)
    ((y * r).sum() + 0.5 * (y ** 2).sum()).backward()

    coef_ref = spec.coefficients.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ ref_of(spec, coef_ref).T
    ((y_ref * r).sum() + 0.5 * (y_ref ** 2).sum()).backward()

    assert spec.coefficients.grad is not None
    assert coef_ref.grad.abs().max() > 1e-3
    torch.testing.assert_close(spec.coefficients.grad, coef_ref.grad, atol=_atol(dtype), rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=_atol(dtype), rtol=1e-5)


def test_gradcheck_apply_delta_and_delta_weight_float64():
    # autograd's own finite differences through both custom Functions (coefficients and input)
    spec = make_spec(5, 7, n_coef=6, dtype=torch.float64, orders=True, seed=11)
    coefficients = spec.coefficients.detach().clone().requires_grad_(True)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)

    def act(c, inp):
        spec.coefficients = c
        return apply_delta(inp, spec)

    def dense(c):
        spec.coefficients = c
        return delta_weight(spec)

    assert torch.autograd.gradcheck(act, (coefficients, x))
    assert torch.autograd.gradcheck(dense, (coefficients,))


def loss_quadratic(dw, target):
    return 0.5 * ((dw - target) ** 2).sum()


def moved_cells(cells: torch.Tensor, i: int, axis: int, step: int, shape) -> torch.Tensor:
    """Cells with coefficient i moved by `step` along `axis`, clamped to the matrix."""
    out = cells.clone()
    out[axis, i] = min(max(int(out[axis, i]) + step, 0), shape[axis] - 1)
    return out


def location_grad_dense(spec: Spectrum, loss_of_dw) -> torch.Tensor:
    spec.locations.grad = None
    loss_of_dw(delta_weight(spec)).backward()
    assert spec.locations.grad is not None
    return spec.locations.grad.detach().clone()


INTERIOR_CELLS = torch.tensor([[2, 4, 6, 3], [3, 7, 1, 5]])  # in an 8 x 9 matrix, neighbours all free


@pytest.mark.parametrize("scaling", [1.0, 2.5])
@pytest.mark.parametrize("orders", [False, True])
def test_location_gradient_interior_is_exact_central_difference_for_quadratic_loss(scaling, orders):
    m, n = 8, 9
    spec = make_spec(m, n, cells=INTERIOR_CELLS, scaling=scaling, dtype=torch.float64, locations=True, orders=orders,
                     seed=4)
    target = torch.randn(m, n, dtype=torch.float64)
    grad = location_grad_dense(spec, lambda dw: loss_quadratic(dw, target))
    a = spec.coefficients.detach()

    def loss_at(cells):
        return loss_quadratic(
            reference_dw(a, cells, m, n, scaling, row_order=spec.row_order, col_order=spec.col_order), target
        ).item()

    for i in range(INTERIOR_CELLS.shape[1]):
        for axis in (0, 1):
            plus = loss_at(moved_cells(spec.cells, i, axis, +1, (m, n)))
            minus = loss_at(moved_cells(spec.cells, i, axis, -1, (m, n)))
            exact = (plus - minus) / 2
            assert abs(exact) > 1e-6
            assert abs(grad[axis, i].item() - exact) < 1e-9 * max(1.0, abs(exact)), (i, axis, grad[axis, i].item(), exact)


@pytest.mark.parametrize("orders", [False, True])
def test_location_gradient_activation_path_exact_for_isometric_input(orders):
    # x with orthonormal columns: 0.5 ||x dW^T - Y||^2 has the Hessian of 0.5 ||dW||^2, so the estimate is exact
    m, n, t = 8, 9, 20
    spec = make_spec(m, n, cells=INTERIOR_CELLS, scaling=1.3, dtype=torch.float64, locations=True, orders=orders,
                     seed=8)
    x = torch.linalg.qr(torch.randn(t, n, dtype=torch.float64)).Q  # (t, n), x^T x = I
    torch.testing.assert_close(x.T @ x, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    y_target = torch.randn(t, m, dtype=torch.float64)
    (0.5 * ((apply_delta(x, spec) - y_target) ** 2).sum()).backward()
    grad = spec.locations.grad
    a = spec.coefficients.detach()
    for i in range(INTERIOR_CELLS.shape[1]):
        for axis in (0, 1):
            losses = []
            for s in (+1, -1):
                dw = reference_dw(a, moved_cells(spec.cells, i, axis, s, (m, n)), m, n, spec.scaling,
                                  row_order=spec.row_order, col_order=spec.col_order)
                losses.append((0.5 * ((x @ dw.T - y_target) ** 2).sum()).item())
            exact = (losses[0] - losses[1]) / 2
            assert abs(exact) > 1e-6
            assert abs(grad[axis, i].item() - exact) < 1e-9 * max(1.0, abs(exact)), (i, axis)


def test_location_gradient_float32_interior_within_1e5():
    m, n = 8, 9
    spec = make_spec(m, n, cells=INTERIOR_CELLS, dtype=torch.float32, locations=True, seed=4)
    target = torch.randn(m, n)
    grad = location_grad_dense(spec, lambda dw: loss_quadratic(dw, target))
    a = spec.coefficients.detach().double()
    for i in range(INTERIOR_CELLS.shape[1]):
        for axis in (0, 1):
            losses = [
                loss_quadratic(reference_dw(a, moved_cells(spec.cells, i, axis, s, (m, n)), m, n, spec.scaling),
                               target.double()).item()
                for s in (+1, -1)
            ]
            exact = (losses[0] - losses[1]) / 2
            assert abs(grad[axis, i].item() - exact) < 1e-5 * max(1.0, abs(exact))


BORDER_CELLS = torch.tensor([[0, 7, 0, 7, 3, 0], [4, 2, 0, 8, 0, 6]])  # 8 x 9: top, bottom, corners, left


def test_location_gradient_at_borders():
    m, n = 8, 9
    spec = make_spec(m, n, cells=BORDER_CELLS, dtype=torch.float64, locations=True, seed=9)
    target = torch.randn(m, n, dtype=torch.float64)
    g = torch.randn(m, n, dtype=torch.float64)
    a = spec.coefficients.detach()

    grad_quadratic = location_grad_dense(spec, lambda dw: loss_quadratic(dw, target))
    grad_linear = location_grad_dense(spec, lambda dw: (g * dw).sum())

    def quadratic_at(cells):
        return loss_quadratic(reference_dw(a, cells, m, n, spec.scaling), target).item()

    def linear_at(cells):
        return (g * reference_dw(a, cells, m, n, spec.scaling)).sum().item()

    checked_clamped = 0
    for i in range(BORDER_CELLS.shape[1]):
        for axis in (0, 1):
            pos, size = int(spec.cells[axis, i]), (m, n)[axis]
            plus = moved_cells(spec.cells, i, axis, +1, (m, n))
            minus = moved_cells(spec.cells, i, axis, -1, (m, n))
            if 0 < pos < size - 1:
                exact = (quadratic_at(plus) - quadratic_at(minus)) / 2
                assert abs(grad_quadratic[axis, i].item() - exact) < 1e-9 * max(1.0, abs(exact)), (i, axis)
            else:
                checked_clamped += 1
            # a loss linear in dW: exact for the clamped one-sided difference too
            exact_linear = (linear_at(plus) - linear_at(minus)) / 2
            assert abs(exact_linear) > 1e-8
            assert abs(grad_linear[axis, i].item() - exact_linear) < 1e-9 * max(1.0, abs(exact_linear)), (i, axis)
    assert checked_clamped >= 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 9), (12, 5), (5, 12)])
@pytest.mark.parametrize("orders", [False, True])
def test_location_gradient_same_on_every_path(dtype, shape, orders):
    m, n = shape
    spec = make_spec(m, n, n_coef=10, dtype=dtype, locations=True, orders=orders, seed=m * n)
    x = torch.randn(2, 6, n, dtype=dtype)
    r = torch.randn(2, 6, m, dtype=dtype)

    def gradients(path):
        spec.locations.grad = None
        spec.coefficients.grad = None
        (DELTA_PRODUCTS[path](x, spec) * r).sum().backward()
        return spec.locations.grad.clone(), spec.coefficients.grad.clone()

    loc_dense, coef_dense = gradients("dense")
    for path in ("activation", "factored"):
        loc_act, coef_act = gradients(path)
        assert loc_act.shape == (2, 10) and loc_act.dtype == dtype
        torch.testing.assert_close(loc_act, loc_dense, atol=_atol(dtype), rtol=1e-5)
        torch.testing.assert_close(coef_act, coef_dense, atol=_atol(dtype), rtol=1e-5)
    assert loc_dense.abs().max() > 1e-3

    # and the loss on outputs is linear in dW, so the estimate is the exact clamped central difference
    a = spec.coefficients.detach().double()
    for i in range(10):
        for axis in (0, 1):
            losses = []
            for s in (+1, -1):
                dw = reference_dw(a, moved_cells(spec.cells, i, axis, s, (m, n)), m, n, spec.scaling,
                                  row_order=spec.row_order, col_order=spec.col_order)
                losses.append(((x.double() @ dw.T) * r.double()).sum().item())
            exact = (losses[0] - losses[1]) / 2
            assert abs(loc_dense[axis, i].item() - exact) < 10 * _atol(dtype) * max(1.0, abs(exact))


def test_location_gradient_dft_same_on_every_path():
    m, n = 7, 10
    spec = make_spec(m, n, n_coef=9, dtype=torch.float64, locations=True, transform="dft", seed=3)
    x = torch.randn(5, n, dtype=torch.float64)
    r = torch.randn(5, m, dtype=torch.float64)
    grads = {}
    for path in PATHS:
        spec.locations.grad = None
        (DELTA_PRODUCTS[path](x, spec) * r).sum().backward()
        grads[path] = spec.locations.grad.clone()
    assert grads["dense"].abs().max() > 1e-3
    for path in ("activation", "factored"):
        torch.testing.assert_close(grads[path], grads["dense"], atol=1e-10, rtol=0)


def test_location_gradient_keeps_float64_precision():
    # the float64 path should not round anything through float32: compare with the exact central difference
    m, n = 8, 9
    spec = make_spec(m, n, cells=INTERIOR_CELLS, dtype=torch.float64, locations=True, seed=4)
    with torch.no_grad():
        spec.coefficients.copy_(torch.tensor([1 / 3, math.pi, -math.e, 0.1], dtype=torch.float64))
    target = torch.randn(m, n, dtype=torch.float64)
    grad = location_grad_dense(spec, lambda dw: loss_quadratic(dw, target))
    a = spec.coefficients.detach()
    for i in range(4):
        for axis in (0, 1):
            losses = [
                loss_quadratic(reference_dw(a, moved_cells(spec.cells, i, axis, s, (m, n)), m, n, spec.scaling),
                               target).item()
                for s in (+1, -1)
            ]
            exact = (losses[0] - losses[1]) / 2
            assert abs(grad[axis, i].item() - exact) < 1e-11 * max(1.0, abs(exact)), (i, axis, grad[axis, i].item() - exact)


@pytest.mark.parametrize("frozen", ["coefficients", "locations"])
@pytest.mark.parametrize("path", PATHS)
def test_frozen_parameter_gets_zero_gradient_and_the_other_a_gradient(path, frozen):
    spec = make_spec(6, 9, n_coef=7, locations=True, train_coefficients=frozen != "coefficients",
                     train_locations=frozen != "locations")
    x = torch.randn(4, 9)
    y = DELTA_PRODUCTS[path](x, spec)
    (y * torch.randn_like(y)).sum().backward()
    trained = "locations" if frozen == "coefficients" else "coefficients"
    frozen_grad, trained_grad = getattr(spec, frozen).grad, getattr(spec, trained).grad
    assert frozen_grad is not None and torch.equal(frozen_grad, torch.zeros_like(frozen_grad))
    assert trained_grad is not None and trained_grad.abs().max() > 0


@pytest.mark.parametrize("path", PATHS)
def test_no_locations_parameter_still_gives_coefficient_gradient(path):
    spec = make_spec(6, 9, n_coef=7, locations=False)
    x = torch.randn(4, 9, requires_grad=True)
    y = DELTA_PRODUCTS[path](x, spec)
    (y ** 2).sum().backward()
    assert spec.coefficients.grad is not None and spec.coefficients.grad.abs().max() > 0
    assert x.grad is not None and x.grad.abs().max() > 0
