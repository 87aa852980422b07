"""The orthonormal DCT-II / DCT-III of ``spectral_peft.transforms`` against scipy, in every dtype, with autograd."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from spectral_peft.transforms import dct, idct, makhoul_order

LENGTHS = list(range(1, 65)) + [97, 127, 251, 509, 1021, 256, 384, 1000, 4096]


def _scipy_dct(x: torch.Tensor, dim: int) -> np.ndarray:
    return scipy.fft.dct(x.detach().double().numpy(), type=2, norm="ortho", axis=dim)


def _scipy_idct(x: torch.Tensor, dim: int) -> np.ndarray:
    return scipy.fft.idct(x.detach().double().numpy(), type=2, norm="ortho", axis=dim)


def _close(actual: torch.Tensor, expected: np.ndarray, atol: float) -> None:
    expected_t = torch.from_numpy(expected)
    assert actual.shape == expected_t.shape
    err = (actual.double() - expected_t).abs().max().item()
    assert err <= atol, f"max error {err:.3e} > {atol:.1e}"


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# against scipy


@pytest.mark.parametrize("n", LENGTHS)
def test_dct_idct_match_scipy_float32_last_dim(n):
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=generator)
    y = dct(x, -1)
    assert y.dtype == torch.float32
    _close(y, _scipy_dct(x, -1), 1e-5)
    z = idct(x, -1)
    assert z.dtype == torch.float32
    _close(z, _scipy_idct(x, -1), 1e-5)


@pytest.mark.parametrize("n", LENGTHS)
def test_dct_idct_match_scipy_float32_dim0(n):
    generator = torch.Generator().manual_seed(1000 + n)
    x = torch.randn(n, 2, generator=generator)
    _close(dct(x, 0), _scipy_dct(x, 0), 1e-5)
    _close(idct(x, 0), _scipy_idct(x, 0), 1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 33, 97, 256, 384, 1000])
@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_dct_idct_match_scipy_3d_every_dim(n, dim):
    generator = torch.Generator().manual_seed(7 * n + dim)
    shape = [2, 3, 4]
    shape[dim] = n
    x = torch.randn(*shape, generator=generator)
    _close(dct(x, dim), _scipy_dct(x, dim), 1e-5)
    _close(idct(x, dim), _scipy_idct(x, dim), 1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 31, 64, 97, 127, 251, 509, 1021, 256, 384, 1000, 4096])
@pytest.mark.parametrize("dim", [0, -1])
def test_dct_idct_match_scipy_float64(n, dim):
    generator = torch.Generator().manual_seed(n)
    shape = (n, 3) if dim == 0 else (3, n)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    y, z = dct(x, dim), idct(x, dim)
    assert y.dtype == torch.float64 and z.dtype == torch.float64
    _close(y, _scipy_dct(x, dim), 1e-10)
    _close(z, _scipy_idct(x, dim), 1e-10)


def test_non_contiguous_input():
    x = torch.randn(16, 12).t()  # (12, 16), not contiguous
    assert not x.is_contiguous()
    _close(dct(x, -1), _scipy_dct(x, -1), 1e-5)
    _close(idct(x, 0), _scipy_idct(x, 0), 1e-5)


def test_dct_of_constant_is_dc_only():
    # an analytic value, independent of scipy: DCT-II(ortho) of ones(n) is sqrt(n) at k=0, zero elsewhere
    n = 10
    y = dct(torch.ones(n, dtype=torch.float64))
    expected = torch.zeros(n, dtype=torch.float64)
    expected[0] = n ** 0.5
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# half precision


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-2), (torch.bfloat16, 1.5e-1)])
@pytest.mark.parametrize("n", [1, 7, 64, 97, 384, 1000])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("fn", [dct, idct], ids=["dct", "idct"])
def test_half_precision_keeps_dtype_and_matches_float32(dtype, atol, n, dim, fn):
    generator = torch.Generator().manual_seed(n)
    shape = (n, 3) if dim == 0 else (3, n)
    x = torch.randn(*shape, generator=generator).to(dtype)
    out = fn(x, dim)
    assert out.dtype == dtype
    assert out.shape == x.shape
    reference = fn(x.float(), dim)
    # the output is the float32 result rounded once to the half dtype; outputs are O(1) (orthonormal transform)
    err = (out.float() - reference).abs().max().item()
    assert err <= atol, f"{dtype}: max error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_dtype(dtype):
    x = torch.randn(4, 16).to(dtype).requires_grad_(True)
    w = torch.randn(4, 16)
    (dct(x, -1).float() * w).sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    # d/dx <dct(x), w> = idct(w)
    torch.testing.assert_close(x.grad.float(), idct(w, -1), atol=3e-2 if dtype == torch.bfloat16 else 5e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# inverse and orthogonality


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 97, 127, 384, 1000, 4096])
@pytest.mark.parametrize("dim", [0, -1])
def test_round_trip(n, dim):
    generator = torch.Generator().manual_seed(n)
    shape = (n, 2) if dim == 0 else (2, n)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(idct(dct(x, dim), dim), x, atol=1e-10, rtol=0)
    torch.testing.assert_close(dct(idct(x, dim), dim), x, atol=1e-10, rtol=0)
    x32 = x.float()
    torch.testing.assert_close(idct(dct(x32, dim), dim), x32, atol=1e-5, rtol=0)


def test_orthonormal_matrix():
    n = 12
    eye = torch.eye(n, dtype=torch.float64)
    t = dct(eye, 0)  # columns are dct of unit vectors: T[k, n]
    torch.testing.assert_close(t @ t.T, eye, atol=1e-12, rtol=0)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    explicit = torch.cos(torch.pi * (2 * j + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    explicit[0] /= 2 ** 0.5
    torch.testing.assert_close(t, explicit, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# autograd


@pytest.mark.parametrize("fn", [dct, idct], ids=["dct", "idct"])
@pytest.mark.parametrize("shape,dim", [((5, 7), 0), ((5, 7), 1), ((5, 7), -1), ((3, 4, 3), 1), ((3, 4, 3), 0), ((3, 4, 3), -1), ((9,), 0)])
def test_gradcheck(fn, shape, dim):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, dim), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [dct, idct], ids=["dct", "idct"])
def test_gradgradcheck(fn):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fn(t, 0), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn,adjoint", [(dct, idct), (idct, dct)], ids=["dct", "idct"])
def test_gradient_is_the_adjoint(fn, adjoint):
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 10, dtype=torch.float64)
    (fn(x, 0) * w).sum().backward()
    torch.testing.assert_close(x.grad, adjoint(w, 0), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64])
@pytest.mark.parametrize("fn", [dct, idct], ids=["dct", "idct"])
def test_non_float_raises_type_error(fn, dtype):
    x = torch.ones(4, 5, dtype=dtype)
    with pytest.raises(TypeError):
        fn(x, -1)


@pytest.mark.parametrize("fn", [dct, idct])
@pytest.mark.parametrize("shape, dim", [((0, 8), -1), ((3, 0), -1), ((0, 8), 0)])
def test_empty_input_gives_empty_output(fn, shape, dim):
    x = torch.zeros(shape, requires_grad=True)
    y = fn(x, dim=dim)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9])
def test_makhoul_order_takes_the_even_samples_then_the_odd_ones_reversed(n):
    expected = [i for i in range(0, n, 2)] + [i for i in range(n - 1, -1, -1) if i % 2]
    assert makhoul_order(n).tolist() == expected
