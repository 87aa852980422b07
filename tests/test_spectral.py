"""``spectral_peft.spectral`` against an explicit dense reference: dW = scaling * P_row^T (T_M^T S T_N) P_col^T.

The reference builds the orthonormal DCT-II matrices by their formula, so nothing here trusts the package's own
transforms. Checked: the dense and activation paths, coefficient and input gradients, LoCA's finite-difference
location gradient (exact cases), phases that freeze a part, and the cell bookkeeping (resolve_moves,
random_cells, check_cells).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import spectral_peft
from spectral_peft import spectral
from spectral_peft.spectral import activation
from spectral_peft.spectral.cache import Placement, PlacementCache, Workspace
from spectral_peft.loca import LocaLinear
from spectral_peft.spectral import (
    DELTA_PRODUCTS,
    Spectrum,
    apply_delta,
    check_cells,
    delta_weight,
    dense_forward,
    random_cells,
)
from spectral_peft.loca.locations import resolve_moves

pytestmark = pytest.mark.usefixtures("one_thread")

PATHS = sorted(DELTA_PRODUCTS)  # activation, dense, factored


# ----------------------------------------------------------------------------------------------------------------
# the dense reference


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


# ----------------------------------------------------------------------------------------------------------------
# the reference itself


def test_reference_dct_matrix_is_orthonormal_and_cosine():
    t = dct_matrix(7)
    torch.testing.assert_close(t @ t.T, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(t[0, 3].item() - 1 / math.sqrt(7)) < 1e-12
    assert abs(t[2, 1].item() - math.sqrt(2 / 7) * math.cos(math.pi * 3 * 2 / 14)) < 1e-12


# ----------------------------------------------------------------------------------------------------------------
# forward: the dense and activation paths


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_delta_half_precision_returns_input_dtype(dtype):
    spec = make_spec(8, 12, n_coef=10, seed=2)
    x = torch.randn(5, 12)
    y = apply_delta(x.to(dtype), spec)
    assert y.dtype == dtype
    expected = x.to(dtype).float() @ ref_of(spec).T.float()
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# coefficient and input gradients


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


def test_blocks_hold_a_fixed_number_of_elements_but_never_fewer_than_the_floor_of_rows():
    cpu = torch.device("cpu")
    narrow = activation.row_blocks(4096, 384, cpu)  # 2^18 elements: 682 rows
    assert [b.stop - b.start for b in narrow] == [682] * 6 + [4]
    wide = activation.row_blocks(1024, 5632, cpu)  # 46 rows would hold 2^18 elements; the floor is 128
    assert [b.stop - b.start for b in wide] == [128] * 8
    assert activation.row_blocks(1024, 5632, torch.device("meta")) == [slice(0, 1024)]  # not a CPU: one block


@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("orders", [False, True])
@pytest.mark.parametrize("into_output", [False, True])
def test_many_row_blocks_match_reference_with_every_gradient(transform, orders, into_output, monkeypatch):
    # blocks of 16 rows, 50 tokens: three full blocks and a short one, in every pass
    monkeypatch.setattr(activation, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(activation, "_BLOCK_MIN_ROWS", 16)
    assert [b.stop - b.start for b in activation.row_blocks(50, 9, torch.device("cpu"))] == [16, 16, 16, 2]
    spec = make_spec(7, 9, n_coef=8, transform=transform, dtype=torch.float64, orders=orders, locations=True,
                     seed=3)
    x = torch.randn(50, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, dtype=torch.float64)
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


def test_activation_path_reorders_follow_orders_set_in_place_or_replaced():
    # S2FT's composed reorders are kept with the placement: new orders, copied in place (as set_orders and loading
    # do) or given as new tensors, must be used while the cells stay put
    spec = make_spec(7, 9, n_coef=6, dtype=torch.float64, orders=True, seed=8)
    cache = _kept(spec)
    x = torch.randn(5, 9, dtype=torch.float64)
    first = apply_delta(x, spec)
    assert ("gathers", x.device) in spec.placement._built
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


def test_on_a_gpu_the_cost_model_picks_the_factored_path_for_wide_layers_and_the_dense_one_for_many_columns():
    gpu = torch.device("cuda")  # the choice reads the device's type only
    llama = make_spec(5632, 2048, n_coef=1000, seed=1)
    assert spectral.choose_path(1024, llama, gpu) == "factored"
    assert spectral.choose_path(1024, llama) == "activation"  # on a CPU
    # the FourierFT mode's 2 n columns at n = 10000 on a 1024-wide layer: the dense path's 1024 x 1024 is less
    many = make_spec(1024, 1024, n_coef=10000, transform="dft", seed=1)
    assert spectral.choose_path(4096, many, gpu) == "dense"


# ----------------------------------------------------------------------------------------------------------------
# layers that read one input share its transform


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
    real = activation.half_spectrum
    monkeypatch.setattr(activation, "half_spectrum",
                        lambda t, *args, **kwargs: calls.append(t.shape[-1]) or real(t, *args, **kwargs))
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


# ----------------------------------------------------------------------------------------------------------------
# LoCA's location gradient


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


# ----------------------------------------------------------------------------------------------------------------
# phases: what is frozen gets a zero gradient, never None


@pytest.mark.parametrize("path", PATHS)
def test_frozen_coefficients_get_zero_gradient(path):
    spec = make_spec(6, 9, n_coef=7, locations=True, train_coefficients=False, train_locations=True)
    x = torch.randn(4, 9)
    y = DELTA_PRODUCTS[path](x, spec)
    (y * torch.randn_like(y)).sum().backward()
    assert spec.coefficients.grad is not None
    assert torch.equal(spec.coefficients.grad, torch.zeros_like(spec.coefficients))
    assert spec.locations.grad is not None and spec.locations.grad.abs().max() > 0


@pytest.mark.parametrize("path", PATHS)
def test_frozen_locations_get_zero_gradient(path):
    spec = make_spec(6, 9, n_coef=7, locations=True, train_coefficients=True, train_locations=False)
    x = torch.randn(4, 9)
    y = DELTA_PRODUCTS[path](x, spec)
    (y * torch.randn_like(y)).sum().backward()
    assert spec.locations.grad is not None
    assert torch.equal(spec.locations.grad, torch.zeros_like(spec.locations))
    assert spec.coefficients.grad is not None and spec.coefficients.grad.abs().max() > 0


@pytest.mark.parametrize("path", PATHS)
def test_no_locations_parameter_still_gives_coefficient_gradient(path):
    spec = make_spec(6, 9, n_coef=7, locations=False)
    x = torch.randn(4, 9, requires_grad=True)
    y = DELTA_PRODUCTS[path](x, spec)
    (y ** 2).sum().backward()
    assert spec.coefficients.grad is not None and spec.coefficients.grad.abs().max() > 0
    assert x.grad is not None and x.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------
# through the layer of a LoCA PEFT model


@pytest.fixture
def loca_layer():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = get_peft_model(BertForSequenceClassification(config),
                           spectral_peft.LocaConfig(target_modules=["query"], n_frequency=40, scaling=1.5,
                                                    location_seed=0))
    layers = [mod for mod in model.modules() if isinstance(mod, LocaLinear)]
    assert len(layers) == 1
    layer = layers[0]
    with torch.no_grad():
        layer.loca_coefficients["default"].copy_(torch.randn(40))
    return layer


@pytest.mark.parametrize("path", [*PATHS, "auto"])
def test_layer_forward_and_delta_weight_match_reference(loca_layer, path):
    layer = loca_layer
    layer.spectral_path = path
    coefficients = layer.loca_coefficients["default"].detach().double()
    cells = layer.loca_cells["default"]
    assert torch.equal(cells, layer.loca_locations["default"].detach().round().long())
    expected = reference_dw(coefficients, cells, 32, 32, 1.5)
    torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, atol=1e-5, rtol=0)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer(x)
        base = layer.get_base_layer()(x)
    torch.testing.assert_close((out - base).double(), x.double() @ expected.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_layer_location_gradient_matches_dense_computation(loca_layer, path):
    layer = loca_layer
    layer.spectral_path = path
    layer.set_phase("default", train_coefficients=False, train_locations=True)
    x = torch.randn(3, 4, 32)
    r = torch.randn(3, 4, 32)
    (layer(x) * r).sum().backward()
    loc_grad = layer.loca_locations["default"].grad
    coef_grad = layer.loca_coefficients["default"].grad
    assert coef_grad is not None and torch.equal(coef_grad, torch.zeros(40))

    # the same location gradient from an explicit spectrum on the same cells
    spec = Spectrum(
        coefficients=layer.loca_coefficients["default"].detach().clone(), cells=layer.loca_cells["default"].clone(),
        out_features=32, in_features=32, scaling=1.5,
        locations=layer.loca_locations["default"].detach().clone().requires_grad_(True), train_coefficients=False,
        train_locations=True,
    )
    (F.linear(x, delta_weight(spec)) * r).sum().backward()
    torch.testing.assert_close(loc_grad, spec.locations.grad, atol=1e-5, rtol=1e-5)
    assert loc_grad.abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# resolve_moves


def _flat(cells, width):
    return (cells[0] * width + cells[1]).tolist()


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
        old_flat, prop_flat, res_flat = _flat(old, n), _flat(proposed, n), _flat(result, n)
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


# ----------------------------------------------------------------------------------------------------------------
# random_cells and check_cells


@pytest.mark.parametrize("shape,n", [((1, 1), 1), ((3, 4), 12), ((3, 4), 5), ((64, 48), 1000), ((1, 50), 20), ((50, 1), 20)])
def test_random_cells_distinct_and_in_range(shape, n):
    cells = random_cells(shape, n, torch.Generator().manual_seed(n))
    assert cells.shape == (2, n)
    assert cells.dtype == torch.long
    assert int(cells[0].min()) >= 0 and int(cells[0].max()) < shape[0]
    assert int(cells[1].min()) >= 0 and int(cells[1].max()) < shape[1]
    assert len(set(_flat(cells, shape[1]))) == n
    check_cells(cells, shape, "test")


def test_random_cells_reproducible_and_covering():
    a = random_cells((8, 8), 64, torch.Generator().manual_seed(5))
    b = random_cells((8, 8), 64, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert sorted(_flat(a, 8)) == list(range(64))


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
