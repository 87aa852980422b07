"""The activation path: half precision, blocks of rows, adding into an output, and the input spectrum that
layers reading one input share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spectral_peft.spectral import (
    activation,
    apply_delta,
    delta_weight,
)
from spectral_peft.spectral.cache import Workspace

from .reference import (
    make_spec,
    ref_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_delta_half_precision_returns_input_dtype(dtype):
    spec = make_spec(8, 12, n_coef=10, seed=2)
    x = torch.randn(5, 12)
    y = apply_delta(x.to(dtype), spec)
    assert y.dtype == dtype
    expected = x.to(dtype).float() @ ref_of(spec).T.float()
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=2e-2)


def test_blocks_hold_a_fixed_number_of_elements_but_never_fewer_than_the_floor_of_rows():
    cpu = torch.device("cpu")
    narrow = activation.row_blocks(4096, 384, cpu)  # 2^18 elements: 682 rows
    assert [b.stop - b.start for b in narrow] == [682] * 6 + [4]
    wide = activation.row_blocks(1024, 5632, cpu)  # 46 rows would hold 2^18 elements; the floor is 128
    assert [b.stop - b.start for b in wide] == [128] * 8
    assert activation.row_blocks(1024, 5632, torch.device("meta")) == [slice(0, 1024)]  # not a CPU: one block


@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("orders", [False, True])
@pytest.mark.parametrize("into_output", [False, True, "frozen"])
def test_many_row_blocks_match_reference_with_every_gradient(transform, orders, into_output, monkeypatch):
    # blocks of 16 rows, 50 tokens: three full blocks and a short one, in every pass
    monkeypatch.setattr(activation, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(activation, "_BLOCK_MIN_ROWS", 16)
    assert [b.stop - b.start for b in activation.row_blocks(50, 9, torch.device("cpu"))] == [16, 16, 16, 2]
    spec = make_spec(7, 9, n_coef=8, transform=transform, dtype=torch.float64, orders=orders, locations=True,
                     seed=3)
    x = torch.randn(50, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, dtype=torch.float64)
    if into_output == "frozen":  # the frozen product computed with the update, one input gradient in backward
        y = activation.linear_with_delta(x, spec, w, None)
    else:
        y = apply_delta(x, spec, out=x @ w.T) if into_output else apply_delta(x, spec)
    (y.sin().sum()).backward()
    with torch.no_grad():
        inferred = apply_delta(x, spec)

    x_ref = x.detach().clone().requires_grad_(True)
    coefficients = spec.coefficients.detach().clone().requires_grad_(True)
    y_ref = x_ref @ ref_of(spec, coefficients).T + (x_ref @ w.T if into_output else 0)
    y_ref.sin().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(inferred, x_ref @ ref_of(spec).T, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(spec.coefficients.grad, coefficients.grad, atol=1e-10, rtol=1e-8)
    # the location gradient of the blocked path against the dense path's (one whole-matrix pass)
    blocked = spec.locations.grad.clone()
    spec.locations.grad = None
    (x.detach() @ delta_weight(spec).T).add(x.detach() @ w.T if into_output else 0).sin().sum().backward()
    assert blocked.abs().max() > 1e-6
    torch.testing.assert_close(blocked, spec.locations.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("transform", ["dct", "dft"])
def test_layers_reading_one_input_share_its_spectrum_and_match_reference(transform, monkeypatch):
    # query, key and value of one input: different shapes and cells, one input transform in the forward pass
    specs = [make_spec(m, 10, n_coef=9, transform=transform, dtype=torch.float64, seed=seed)
             for seed, m in enumerate((10, 7, 13))]
    workspace = Workspace()
    for spec in specs:
        spec.workspace = workspace
    x = torch.randn(4, 5, 10, dtype=torch.float64, requires_grad=True)
    calls = []
    for name in ("half_spectrum", "kept_half_spectrum"):  # a block's transform, and a whole batch's kept one
        real = getattr(activation, name)
        monkeypatch.setattr(activation, name, lambda t, *args, real=real: calls.append(t.shape[-1]) or real(t, *args))
    ys = [apply_delta(x, spec) for spec in specs]
    assert calls == [10]  # the input, once; no output is transformed in forward
    loss = sum(((y - 0.3) ** 2).sum() for y in ys)
    loss.backward()
    assert sorted(calls[1:]) == [7, 10, 13]  # backward: each output gradient, the input never again

    x_ref = x.detach().clone().requires_grad_(True)
    coefficients = [spec.coefficients.detach().clone().requires_grad_(True) for spec in specs]
    ys_ref = [x_ref @ ref_of(spec, c).T for spec, c in zip(specs, coefficients)]
    sum(((y - 0.3) ** 2).sum() for y in ys_ref).backward()
    for y, y_ref in zip(ys, ys_ref):
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    for spec, c in zip(specs, coefficients):
        torch.testing.assert_close(spec.coefficients.grad, c.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)


def test_shared_spectrum_follows_in_place_changes_and_is_dropped_with_its_input():
    # shared in training (backward keeps it anyway); the coefficients' gradient turns that on
    spec = make_spec(6, 9, transform="dct", dtype=torch.float64)
    spec.workspace = Workspace()
    assert spec.coefficients.requires_grad
    x = torch.randn(3, 9, dtype=torch.float64)
    apply_delta(x, spec)
    with torch.no_grad():
        x.mul_(-2.0)  # same tensor, new version
    torch.testing.assert_close(apply_delta(x, spec), x @ ref_of(spec).T, atol=1e-10, rtol=1e-8)
    assert spec.workspace._local.shared is not None
    del x
    assert spec.workspace._local.shared is None  # nothing of a freed input is kept


def test_inference_shares_nothing():
    # without gradients each block of rows is transformed where it is used: nothing whole-batch to share
    spec = make_spec(6, 9, transform="dct", dtype=torch.float64)
    spec.workspace = Workspace()
    x = torch.randn(3, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(apply_delta(x, spec), x @ ref_of(spec).T, atol=1e-10, rtol=1e-8)
    assert getattr(spec.workspace._local, "shared", None) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_inputs_share_the_spectrum_of_their_own_input_only(dtype):
    # a half-precision input is cast to float32 on each call: the shared spectrum belongs to the input the layer
    # was called with, never to the memory of a cast that the next cast may reuse
    spec = make_spec(6, 9, transform="dct")
    spec.workspace = Workspace()
    xs = [torch.randn(3, 9).to(dtype) for _ in range(3)]
    ys = [apply_delta(x, spec) for x in xs]
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y.detach().float(), x.float() @ ref_of(spec).T.float(), atol=2e-2, rtol=2e-2)


def test_s2ft_column_orders_are_never_shared():
    specs = [make_spec(6, 9, transform="dct", dtype=torch.float64, seed=seed, orders=True) for seed in range(3)]
    specs.insert(1, make_spec(6, 9, transform="dct", dtype=torch.float64, seed=7))  # a plain layer in between
    x = torch.randn(3, 9, dtype=torch.float64)
    with torch.no_grad():
        for spec in specs:
            torch.testing.assert_close(apply_delta(x, spec), x @ ref_of(spec).T, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("orders", [False, True])
def test_apply_delta_into_an_output_adds_in_place_with_both_gradients(transform, orders):
    spec = make_spec(7, 9, n_coef=8, transform=transform, dtype=torch.float64, orders=orders)
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    out = F.linear(x.reshape(-1, 9), w)
    address = out.data_ptr()
    y = apply_delta(x, spec, out=out)
    assert y is out and y.data_ptr() == address
    (y.sin().sum()).backward()

    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    coefficients = spec.coefficients.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref.reshape(-1, 9), w_ref) + x_ref.reshape(-1, 9) @ ref_of(spec, coefficients).T
    y_ref.sin().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    for got, want in ((x.grad, x_ref.grad), (w.grad, w_ref.grad), (spec.coefficients.grad, coefficients.grad)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_apply_delta_refuses_an_output_it_cannot_add_into():
    spec = make_spec(7, 9)
    x = torch.randn(2, 3, 9)
    with pytest.raises(ValueError, match="apply_delta: out must be"):
        apply_delta(x, spec, out=torch.zeros(2, 3, 7))  # not (tokens, M)
    with pytest.raises(ValueError, match="apply_delta: out must be"):
        apply_delta(x, spec, out=torch.zeros(12, 7)[::2])  # a view


@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("orders", [False, True])
@pytest.mark.parametrize("product", ["linear_with_delta", "folded_linear"])
def test_a_frozen_product_with_the_update_matches_reference_and_refuses_what_it_cannot_own(transform, orders, product):
    # linear_with_delta adds the update through the activations, folded_linear folds dW into the weight; both give
    # the input, coefficient and location gradients of F.linear(x, W + dW, b), and none to W or b
    spec = make_spec(7, 9, n_coef=8, transform=transform, dtype=torch.float64, orders=orders, locations=True, seed=4)
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(7, 9, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    y = getattr(activation, product)(x, spec, w, b)
    y.sin().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    coefficients = spec.coefficients.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref.reshape(-1, 9), w + ref_of(spec, coefficients), b)
    y_ref.sin().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(spec.coefficients.grad, coefficients.grad, atol=1e-10, rtol=1e-8)
    # the location gradient against the dense path's (autograd through dW)
    located = spec.locations.grad.clone()
    spec.locations.grad = None
    F.linear(x.detach().reshape(-1, 9), w + delta_weight(spec), b).sin().sum().backward()
    assert located.abs().max() > 1e-6
    torch.testing.assert_close(located, spec.locations.grad, atol=1e-10, rtol=1e-8)
    for weight, bias, inputs in ((w.clone().requires_grad_(True), b, x), (w, b.clone().requires_grad_(True), x),
                                 (w.float(), b.float(), x.float().to(torch.bfloat16))):
        with pytest.raises(ValueError, match=f"{product}: weight and bias must be frozen"):
            getattr(activation, product)(inputs, spec, weight, bias)
