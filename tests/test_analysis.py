"""spectral_peft.analysis: spectral_energy against a direct scipy / numpy computation, and the measures of a weight
change (each against a direct computation on small matrices with known answers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from spectral_peft.analysis import (
    analyze_matrix,
    compare_locations,
    error_from_share,
    flatness_of,
    mean_distance,
    overlap,
    power_spectrum,
    share_at,
    spectral_energy,
    spectral_flatness,
    svd_errors,
    top_power_cells,
)


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


# ---------------------------------------------------------------------------------------------------------------
# measures of a weight change


def from_dct(spectrum: np.ndarray) -> torch.Tensor:
    """The matrix whose orthonormal 2-D DCT-II is ``spectrum``."""
    return torch.from_numpy(scipy.fft.idctn(spectrum, type=2, norm="ortho"))


def dct_atoms(shape, cells, values) -> torch.Tensor:
    spectrum = np.zeros(shape)
    for (r, c), v in zip(cells, values):
        spectrum[r, c] = v
    return from_dct(spectrum)


def test_svd_error_of_a_rank_one_matrix_is_zero_and_of_rank_two_known():
    u, v = torch.randn(12, 1, dtype=torch.float64), torch.randn(1, 9, dtype=torch.float64)
    assert svd_errors(u @ v, [1, 2, 5]) == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)
    # singular values 3 and 1 on orthonormal vectors: the best rank-1 error is 1 / sqrt(10)
    q1, _ = torch.linalg.qr(torch.randn(12, 2, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(9, 2, dtype=torch.float64))
    matrix = 3 * q1[:, :1] @ q2[:, :1].T + q1[:, 1:] @ q2[:, 1:].T
    assert svd_errors(matrix, [1, 2]) == pytest.approx([1 / math.sqrt(10), 0.0], abs=1e-7)


def test_a_matrix_of_k_dct_atoms_is_captured_by_k_coefficients_and_its_spectrum_is_not_flat():
    shape, cells, values = (16, 24), [(0, 0), (3, 7), (15, 23), (8, 1)], [4.0, -3.0, 2.0, 1.0]
    matrix = dct_atoms(shape, cells, values)
    result = analyze_matrix(matrix, ranks=(1, 2), fractions=(4 / 384, 3 / 384))
    assert result["energy"]["dct"]["original"] == pytest.approx([1.0, 1 - 1 / 30], abs=1e-9)
    assert spectral_flatness(matrix) < 1e-6
    assert {tuple(c) for c in top_power_cells(power_spectrum(matrix), 4).T.tolist()} == set(cells)
    # budget r(M+N) = 40 >= 4 coefficients: the top-P DCT approximation is exact; a rank-1 one is not
    first = result["errors"][0]
    assert first["budget"] == 40 and first["dct_top"] == pytest.approx(0.0, abs=1e-7) and first["svd"] > 0.1


def test_flatness_of_a_flat_spectrum_is_one_and_of_white_noise_the_chi_squared_value():
    signs = np.where(np.random.default_rng(0).random((20, 30)) < 0.5, -1.0, 1.0)
    assert spectral_flatness(from_dct(signs)) == pytest.approx(1.0, abs=1e-9)
    noise = torch.randn(256, 256, dtype=torch.float64)
    gamma = 0.5772156649
    assert spectral_flatness(noise, "dct") == pytest.approx(math.exp(-gamma) / 2, abs=0.01)
    assert spectral_flatness(noise, "dft") == pytest.approx(math.exp(-gamma), abs=0.01)
    assert flatness_of(torch.zeros(3, 3)) == 0.0


def test_error_at_fixed_locations_equals_the_least_squares_fit_on_those_atoms():
    """The optimal coefficients on a fixed support, fitted directly by least squares over the DCT atoms."""
    shape = (6, 5)
    matrix = torch.randn(*shape, dtype=torch.float64)
    cells = torch.tensor([[0, 2, 5, 3, 1], [0, 4, 1, 3, 2]])
    atoms = np.stack([dct_atoms(shape, [(int(r), int(c))], [1.0]).numpy().ravel() for r, c in cells.T])
    coef, *_ = np.linalg.lstsq(atoms.T, matrix.numpy().ravel(), rcond=None)
    direct = np.linalg.norm(matrix.numpy().ravel() - atoms.T @ coef) / np.linalg.norm(matrix.numpy())
    assert error_from_share(share_at(power_spectrum(matrix), cells)) == pytest.approx(direct, rel=1e-9)


def test_random_locations_of_a_flat_matrix_keep_their_share_of_entries():
    result = analyze_matrix(torch.randn(64, 64, dtype=torch.float64), ranks=(4,))
    budget = result["errors"][0]["budget"]
    expected = math.sqrt(1 - budget / 64**2)
    assert result["errors"][0]["dct_random"] == pytest.approx(expected, abs=0.02)


def smooth(m: int, n: int) -> torch.Tensor:
    i = torch.linspace(0, 1, m, dtype=torch.float64)[:, None]
    j = torch.linspace(0, 1, n, dtype=torch.float64)[None, :]
    return torch.sin(3 * i + 2 * j) + torch.cos(4 * i * j) + i * j


def test_a_shuffled_smooth_matrix_is_flat_and_its_own_ordering_makes_it_sparse_again():
    m, n = 48, 40
    generator = torch.Generator().manual_seed(0)
    clean = smooth(m, n)
    shuffled = clean[torch.randperm(m, generator=generator)][:, torch.randperm(n, generator=generator)]
    k = round(0.01 * m * n)
    result = analyze_matrix(shuffled, prior=clean * 0 + shuffled, fractions=(0.01,), ranks=(1,))
    smooth_share = analyze_matrix(clean, fractions=(0.01,), ranks=(1,))["energy"]["dct"]["original"][0]
    energy = result["energy"]["dct"]
    assert smooth_share > 0.99 and k == 19
    assert energy["original"][0] < 0.9 < energy["self"][0]
    assert energy["prior"][0] == pytest.approx(energy["self"][0])  # the prior is the matrix itself here
    assert abs(energy["random"][0] - energy["original"][0]) < 0.2  # shuffling a shuffle keeps it shuffled


def test_top_power_cells_of_the_dft_keep_one_cell_of_each_conjugate_pair():
    # a real cosine along the rows: its DFT power sits in the conjugate pair (3, 0) and (13, 0), one atom
    i = torch.arange(16, dtype=torch.float64)[:, None]
    power = power_spectrum(torch.cos(2 * torch.pi * 3 * i / 16).expand(16, 8).contiguous(), "dft")
    assert top_power_cells(power, 1, "dft").T.tolist() == [[3, 0]]
    assert {tuple(c) for c in top_power_cells(power, 2).T.tolist()} == {(3, 0), (13, 0)}
    assert (13, 0) not in {tuple(c) for c in top_power_cells(power, 2, "dft").T.tolist()}
    # S2FT's top_cells takes the spectrum itself and picks the same cells
    from spectral_peft.analysis import transform_2d
    from spectral_peft.s2ft import top_cells

    spectrum = transform_2d(torch.cos(2 * torch.pi * 3 * i / 16).expand(16, 8).contiguous(), "dft")
    assert torch.equal(top_cells(spectrum, 5, "dft"), top_power_cells(power, 5, "dft"))


def test_overlap_and_distance_of_cell_sets():
    a = torch.tensor([[0, 1, 2], [0, 1, 2]])
    b = torch.tensor([[0, 1, 5], [0, 2, 5]])
    assert overlap(a, b, n_cols=6) == 1
    # (0,0) -> itself 0; (1,1) -> (1,2) 1; (2,2) -> (1,2) 1
    assert mean_distance(a, b) == pytest.approx(2 / 3)


def test_locations_of_a_loca_layer_against_a_reference(tiny_bert):
    """Locations placed on the reference's top-n cells overlap it fully; the initial draw is redrawn exactly."""
    from peft import get_peft_model

    import spectral_peft

    config = spectral_peft.LocaConfig(target_modules=["query"], n_frequency=20, location_seed=3)
    model = get_peft_model(tiny_bert, config)
    name = "bert.encoder.layer.0.attention.self.query"
    layer = model.base_model.model.get_submodule(name)
    initial = layer.spectrum("default").cells.clone()
    reference = torch.randn(32, 32, dtype=torch.float64)
    best = top_power_cells(power_spectrum(reference), 20)
    layer.set_locations("default", best)
    result = compare_locations(layer, "default", reference, config)
    assert result["overlap"] == 1.0 and result["mean_distance"] == 0.0 and result["moved"] == 1.0 - overlap(
        best, initial, 32) / 20
    assert result["energy_share"] == pytest.approx(result["top_n_energy_share"])
    assert result["initial_energy_share"] == pytest.approx(share_at(power_spectrum(reference), initial))
