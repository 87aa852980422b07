"""spectral_peft.analysis.spectral_energy against a direct scipy / numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from spectral_peft.analysis import spectral_energy


def reference_energy(matrix: np.ndarray, k: int, transform: str, row_order=None, col_order=None) -> float:
    """Share of the squared Frobenius norm in the k largest |coef|^2 of the orthonormal 2-D transform."""
    m = np.asarray(matrix, dtype=np.float64)
    if row_order is not None:
        m = m[np.asarray(row_order)]
    if col_order is not None:
        m = m[:, np.asarray(col_order)]
    if transform == "dct":
        coef = scipy.fft.dctn(m, type=2, norm="ortho")
    else:
        coef = np.fft.fft2(m, norm="ortho")
    power = np.sort(np.abs(coef).ravel() ** 2)[::-1]
    return float(power[:k].sum() / power.sum())


def smooth_plus_noise(m: int, n: int, seed: int) -> torch.Tensor:
    """A matrix whose energy is neither all in a few coefficients nor flat (so k matters)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.linspace(0, 1, m)[:, None]
    j = torch.linspace(0, 1, n)[None, :]
    return torch.sin(3 * i + 2 * j) + torch.cos(5 * i * j) + 0.3 * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (33, 7)])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_matches_scipy_without_orders(transform, shape, k):
    matrix = smooth_plus_noise(*shape, seed=shape[0] * 100 + k)
    got = spectral_energy(matrix, k, transform=transform)
    want = reference_energy(matrix.numpy(), k, transform)
    assert isinstance(got, float)
    assert got == pytest.approx(want, abs=1e-5)
    assert 0.0 < got <= 1.0


@pytest.mark.parametrize("transform", ["dct", "dft"])
@pytest.mark.parametrize("which", ["rows", "cols", "both"])
def test_matches_scipy_with_orders(transform, which):
    g = torch.Generator().manual_seed(7)
    matrix = smooth_plus_noise(24, 18, seed=3)
    row_order = torch.randperm(24, generator=g) if which in ("rows", "both") else None
    col_order = torch.randperm(18, generator=g) if which in ("cols", "both") else None
    for k in (1, 10, 43):
        got = spectral_energy(matrix, k, transform=transform, row_order=row_order, col_order=col_order)
        want = reference_energy(
            matrix.numpy(), k, transform,
            None if row_order is None else row_order.numpy(),
            None if col_order is None else col_order.numpy(),
        )
        assert got == pytest.approx(want, abs=1e-5)
    # the orders matter: shuffling a smooth matrix spreads its spectrum, so the reordered energy is lower
    unordered = spectral_energy(matrix, 10, transform=transform)
    ordered = spectral_energy(matrix, 10, transform=transform, row_order=row_order, col_order=col_order)
    assert ordered < unordered - 0.01


def test_orders_give_same_as_permuting_first():
    matrix = smooth_plus_noise(20, 15, seed=1)
    r, c = torch.randperm(20), torch.randperm(15)
    assert spectral_energy(matrix, 9, row_order=r, col_order=c) == pytest.approx(
        spectral_energy(matrix[r][:, c], 9), abs=1e-7
    )


def test_float64_and_half_inputs():
    matrix = smooth_plus_noise(16, 16, seed=5)
    want = reference_energy(matrix.numpy(), 8, "dct")
    assert spectral_energy(matrix.double(), 8) == pytest.approx(want, abs=1e-9)
    assert spectral_energy(matrix.half(), 8) == pytest.approx(want, abs=2e-3)
    assert spectral_energy(matrix.bfloat16(), 8) == pytest.approx(want, abs=1e-2)


@pytest.mark.parametrize("shape", [(16, 16), (10, 24)])
def test_k_dct_atoms_have_all_energy_at_k(shape):
    m, n = shape
    k = 6
    g = torch.Generator().manual_seed(11)
    cells = torch.randperm(m * n, generator=g)[:k].numpy()
    spectrum = np.zeros((m, n))
    spectrum.flat[cells] = np.random.default_rng(0).uniform(1.0, 2.0, size=k) * np.array([1, -1, 1, -1, 1, -1])
    matrix = torch.from_numpy(scipy.fft.idctn(spectrum, type=2, norm="ortho"))  # a sum of k 2-D DCT atoms
    assert spectral_energy(matrix, k) == pytest.approx(1.0, abs=1e-9)
    assert spectral_energy(matrix, k + 5) == pytest.approx(1.0, abs=1e-9)
    # one fewer atom misses the smallest one's share exactly
    smallest = np.min(spectrum.flat[cells] ** 2) / np.sum(spectrum ** 2)
    assert spectral_energy(matrix, k - 1) == pytest.approx(1.0 - smallest, abs=1e-9)
    assert spectral_energy(matrix, k - 1) < 1.0 - 0.05
    # in float32 too
    assert spectral_energy(matrix.float(), k) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("transform", ["dct", "dft"])
def test_constant_matrix_has_all_energy_in_one_coefficient(transform):
    matrix = torch.full((12, 9), -2.5)
    assert spectral_energy(matrix, 1, transform=transform) == pytest.approx(1.0, abs=1e-6)


def test_single_dft_frequency():
    # a real cosine wave along rows: its DFT energy sits in a conjugate pair of cells, half in each
    i = torch.arange(16, dtype=torch.float64)[:, None]
    matrix = torch.cos(2 * torch.pi * 3 * i / 16).expand(16, 8).contiguous()
    assert spectral_energy(matrix, 1, transform="dft") == pytest.approx(0.5, abs=1e-9)
    assert spectral_energy(matrix, 2, transform="dft") == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("transform", ["dct", "dft"])
def test_k_zero_is_zero_and_large_k_is_one(transform):
    matrix = smooth_plus_noise(8, 8, seed=2)
    assert spectral_energy(matrix, 0, transform=transform) == 0.0
    assert spectral_energy(matrix, 64, transform=transform) == pytest.approx(1.0, abs=1e-6)
    assert spectral_energy(matrix, 10_000, transform=transform) == pytest.approx(1.0, abs=1e-6)


def test_energy_grows_with_k():
    matrix = smooth_plus_noise(16, 16, seed=4)
    values = [spectral_energy(matrix, k) for k in range(0, 257, 16)]
    assert all(b >= a - 1e-7 for a, b in zip(values, values[1:]))
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0, abs=1e-6)


def test_zero_matrix_is_zero():
    assert spectral_energy(torch.zeros(5, 7), 3) == 0.0


@pytest.mark.parametrize(
    "matrix, k, transform",
    [
        (torch.ones(8), 1, "dct"),  # 1-D
        (torch.ones(2, 3, 4), 1, "dct"),  # 3-D
        (torch.ones(4, 4), -1, "dct"),  # negative k
        (torch.ones(4, 4), 2.5, "dct"),  # non-integer k
        (torch.ones(4, 4), 1, "foo"),  # unknown transform
    ],
)
def test_bad_input_raises_value_error(matrix, k, transform):
    with pytest.raises(ValueError):
        spectral_energy(matrix, k, transform=transform)


@pytest.mark.parametrize("order, message", [(torch.zeros(6, dtype=torch.long), "not a permutation"),
                                            (torch.arange(5), "permutation of 6"),
                                            (torch.arange(6.0), "integer")])
@pytest.mark.parametrize("which", ["row_order", "col_order"])
def test_orders_must_be_permutations(order, message, which):
    with pytest.raises(ValueError, match=rf"{which}.*{message}"):
        spectral_energy(torch.randn(6, 6), 3, **{which: order})
