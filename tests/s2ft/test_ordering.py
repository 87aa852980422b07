"""S2FT's row/column orderings: the greedy nearest-neighbour chain, its 2-opt refinement, chunked distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectral_peft import nearest_neighbor_order
from spectral_peft.analysis import spectral_energy
from spectral_peft.s2ft.ordering import pairwise_sq_distances, path_length


def is_permutation(order: torch.Tensor, d: int) -> bool:
    return order.dim() == 1 and order.numel() == d and torch.equal(order.sort().values, torch.arange(d))


def reference_greedy_chain(matrix: np.ndarray) -> list[int]:
    """Start at the row farthest from the mean row; append the nearest unused row (squared Euclidean)."""
    x = np.asarray(matrix, dtype=np.float64)
    d = x.shape[0]
    start = int(np.argmax(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    order, used = [start], {start}
    while len(order) < d:
        last = x[order[-1]]
        best, best_dist = None, np.inf
        for j in range(d):
            if j in used:
                continue
            dist = float(((x[j] - last) ** 2).sum())
            if dist < best_dist:
                best, best_dist = j, dist
        order.append(best)
        used.add(best)
    return order


def random_matrix(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# what it returns


@pytest.mark.parametrize("two_ended", [False, True])
@pytest.mark.parametrize("refine_passes", [0, 1, 8])
@pytest.mark.parametrize("shape", [(1, 4), (2, 4), (3, 4), (3, 1), (17, 5), (40, 40)])
def test_returns_long_permutation(two_ended, refine_passes, shape):
    matrix = random_matrix(*shape, seed=shape[0])
    order = nearest_neighbor_order(matrix, two_ended=two_ended, refine_passes=refine_passes)
    assert isinstance(order, torch.Tensor)
    assert order.dtype == torch.long
    assert is_permutation(order, shape[0])


def test_tiny_edge_cases():
    assert nearest_neighbor_order(torch.tensor([[3.0, 1.0]])).tolist() == [0]
    assert sorted(nearest_neighbor_order(torch.tensor([[3.0], [1.0]])).tolist()) == [0, 1]
    # three points on a line: the chain starts at an end (farthest from the mean) and walks along the line
    line = torch.tensor([[0.0], [10.0], [1.0]])
    order = nearest_neighbor_order(line, refine_passes=0).tolist()
    assert order == [1, 2, 0]
    # identical rows (all distances zero) still give a permutation
    assert is_permutation(nearest_neighbor_order(torch.ones(5, 3)), 5)


def test_default_refine_is_at_least_as_short_as_plain_chain():
    matrix = random_matrix(60, 6, seed=3)
    dist = pairwise_sq_distances(matrix)
    default = nearest_neighbor_order(matrix)
    greedy = nearest_neighbor_order(matrix, refine_passes=0)
    assert path_length(default, dist) <= path_length(greedy, dist) + 1e-4


# --------------------------------------------------------------------------------------------------------------
# the greedy chain against a straightforward reference


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(12, 3), (25, 8), (9, 30)])
def test_plain_greedy_chain_matches_reference(seed, shape):
    matrix = random_matrix(*shape, seed=seed) * 3 + 1.0  # an offset mean: the start is not simply the largest row
    order = nearest_neighbor_order(matrix, refine_passes=0)
    assert order.tolist() == reference_greedy_chain(matrix.numpy())


def test_start_is_farthest_from_mean():
    matrix = random_matrix(30, 4, seed=9)
    matrix[17] += 20.0  # an outlier
    for two_ended in (False, True):
        order = nearest_neighbor_order(matrix, two_ended=two_ended, refine_passes=0)
        # one-ended: the chain starts there; two-ended: the start is inside the chain but its path is a permutation
        if not two_ended:
            assert int(order[0]) == 17
        assert 17 in order.tolist()


def test_two_ended_chain_is_never_longer_than_walk_from_both_ends():
    # on points along a line the two-ended chain reaches the line order exactly
    t = torch.tensor([0.0, 5.0, 1.0, 9.0, 3.0, 7.0, 2.0])
    matrix = torch.stack([t, 2 * t], dim=1)
    order = nearest_neighbor_order(matrix, two_ended=True, refine_passes=0)
    values = t[order].tolist()
    assert values == sorted(values) or values == sorted(values, reverse=True)


# --------------------------------------------------------------------------------------------------------------
# 2-opt


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("two_ended", [False, True])
def test_two_opt_never_lengthens_the_greedy_chain(seed, two_ended):
    matrix = random_matrix(50, 4, seed=seed)
    dist = pairwise_sq_distances(matrix)
    greedy = nearest_neighbor_order(matrix, two_ended=two_ended, refine_passes=0)
    lengths = [path_length(greedy, dist)]
    for passes in (1, 2, 8):
        refined = nearest_neighbor_order(matrix, two_ended=two_ended, refine_passes=passes)
        assert is_permutation(refined, 50)
        lengths.append(path_length(refined, dist))
    assert all(b <= a + 1e-4 for a, b in zip(lengths, lengths[1:])), lengths


def test_two_opt_shortens_a_bad_chain():
    # on random points in the plane the greedy chain leaves crossings that 2-opt removes
    matrix = random_matrix(80, 2, seed=0)
    dist = pairwise_sq_distances(matrix)
    greedy = path_length(nearest_neighbor_order(matrix, refine_passes=0), dist)
    refined = path_length(nearest_neighbor_order(matrix, refine_passes=8), dist)
    assert refined < 0.99 * greedy


# --------------------------------------------------------------------------------------------------------------
# recovering smoothness


def test_recovers_a_shuffled_smooth_sequence():
    g = torch.Generator().manual_seed(0)
    d, k = 200, 50
    t = torch.rand(d, generator=g).sort().values
    freqs = torch.linspace(1, 4, k)
    phases = torch.rand(k, generator=g) * 2 * torch.pi
    smooth = torch.sin(3 * t[:, None] * freqs[None, :] + phases)  # rows: a smooth curve in t
    shuffle = torch.randperm(d, generator=g)
    shuffled = smooth[shuffle]
    n = d * k // 100  # 1% of the entries
    target = spectral_energy(smooth, n)
    assert spectral_energy(shuffled, n) < target - 0.3  # the shuffle destroyed the sparsity
    for two_ended in (False, True):
        order = nearest_neighbor_order(shuffled, two_ended=two_ended)
        recovered = spectral_energy(shuffled, n, row_order=order)
        assert recovered >= target - 0.05, (two_ended, recovered, target)
        # the recovered order is the sorted t, forwards or backwards
        t_seen = t[shuffle][order]
        diffs = t_seen[1:] - t_seen[:-1]
        assert bool((diffs >= 0).all()) or bool((diffs <= 0).all())


def _rank8_signal(kind: str, d: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian factors":
        return torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g)
    # orthonormal factors with singular values decaying from 1 to 0.1, as a trained update's are
    u = torch.linalg.qr(torch.randn(d, 8, generator=g))[0]
    v = torch.linalg.qr(torch.randn(d, 8, generator=g))[0]
    return u @ torch.diag(torch.logspace(0, -1, 8)) @ v.T


@pytest.mark.parametrize("kind, at_least", [("gaussian factors", 0.5), ("decaying singular values", 0.55)])
def test_rank8_plus_noise_energy_quadruples(kind, at_least):
    """Top-1% DCT energy of a rank-8 + 5% noise 768 x 768 matrix: about 0.11-0.14 in its own order, at least four
    times that after the orderings. Gaussian factors (flat singular values) measure 0.53 at the defaults, a
    decaying spectrum 0.8."""
    g = torch.Generator().manual_seed(0)
    d = 768
    signal = _rank8_signal(kind, d, g)
    noise = torch.randn(d, d, generator=g)
    noise *= 0.05 * signal.norm() / noise.norm()
    matrix = signal + noise
    n = d * d // 100
    before = spectral_energy(matrix, n)
    rows = nearest_neighbor_order(matrix)
    cols = nearest_neighbor_order(matrix.T)
    assert is_permutation(rows, d) and is_permutation(cols, d)
    after = spectral_energy(matrix, n, row_order=rows, col_order=cols)
    print(f"\nrank-8 ({kind}) + 5% noise, 768x768, top-1% DCT energy: before {before:.4f}, after {after:.4f}")
    assert 0.09 < before < 0.16
    assert after >= 4 * before
    assert after >= at_least


# --------------------------------------------------------------------------------------------------------------
# distances and bad input


@pytest.mark.parametrize("shape", [(1500, 24), (1025, 3), (7, 5)])
def test_pairwise_sq_distances_matches_cdist(shape):
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(*shape, generator=g) + 5.0  # an offset that the Gram trick must survive
    got = pairwise_sq_distances(matrix)
    want = torch.cdist(matrix.double(), matrix.double()) ** 2
    assert got.shape == (shape[0], shape[0])
    assert got.dtype == torch.float32
    scale = float(want.max())
    assert float((got.double() - want).abs().max()) <= 1e-5 * scale
    assert float(got.min()) >= 0.0
    assert float(got.diagonal().abs().max()) <= 1e-5 * scale


def test_pairwise_sq_distances_of_half_and_double():
    matrix = torch.randn(30, 6)
    want = torch.cdist(matrix.double(), matrix.double()) ** 2
    torch.testing.assert_close(pairwise_sq_distances(matrix.double()).double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pairwise_sq_distances(matrix.half()).double(), torch.cdist(
        matrix.half().double(), matrix.half().double()) ** 2, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    matrix = torch.randn(10, 4)
    matrix[3, 2] = bad
    with pytest.raises(ValueError):
        nearest_neighbor_order(matrix)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_non_matrix_input_raises(shape):
    with pytest.raises(ValueError):
        nearest_neighbor_order(torch.randn(*shape))
