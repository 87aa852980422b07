"""Measures of how sparse a matrix's spectrum is, and of how well sparse spectra and low-rank factors approximate a
weight change (what ``spectral-peft analyze`` reports)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .spectral import TRANSFORMS, check_permutation
from .transforms import COMPUTE_DTYPES, dct


def transform_2d(matrix: torch.Tensor, transform: str = "dct") -> torch.Tensor:
    """Orthonormal 2-D transform of a matrix (DCT-II on both axes, or the unitary DFT), in float32 or float64."""
    work = matrix if matrix.dtype in COMPUTE_DTYPES else matrix.float()
    if transform == "dct":
        return dct(dct(work, dim=0), dim=1)
    if transform == "dft":
        return torch.fft.fft2(work, norm="ortho")
    raise ValueError(f"transform must be 'dct' or 'dft', got {transform!r}")


def permute(matrix: torch.Tensor, row_order: Optional[torch.Tensor] = None, col_order: Optional[torch.Tensor] = None):
    """``matrix[row_order][:, col_order]`` (either order may be None; each must be a permutation)."""
    for what, order, size in (("row_order", row_order, matrix.shape[0]), ("col_order", col_order, matrix.shape[-1])):
        if order is not None:
            check_permutation(order, size, what)
    if row_order is not None:
        matrix = matrix.index_select(0, row_order.to(matrix.device))
    if col_order is not None:
        matrix = matrix.index_select(1, col_order.to(matrix.device))
    return matrix


def power_spectrum(
    matrix: torch.Tensor,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``|coefficient|^2`` of the orthonormal 2-D transform of the (reordered) matrix, same shape as ``matrix``."""
    if matrix.dim() != 2:
        raise ValueError(f"a 2-D matrix is needed, got shape {tuple(matrix.shape)}")
    return transform_2d(permute(matrix, row_order, col_order), transform).abs().pow(2)


def energy_shares(
    matrix: torch.Tensor,
    ks,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> list[float]:
    """:func:`spectral_energy` for several ``k`` from one transform (the power sorted once)."""
    for k in ks:
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"spectral_energy: k must be a non-negative integer, got {k!r}")
    cumulative = cumulative_shares(power_spectrum(matrix, transform, row_order, col_order))
    return [float(cumulative[min(k, cumulative.numel()) - 1]) if k else 0.0 for k in ks]


def cumulative_shares(power: torch.Tensor) -> torch.Tensor:
    """Entry ``k - 1``: the share of the total held by the ``k`` largest entries of ``power`` (zeros if all zero)."""
    power = power.flatten()
    total = power.sum()
    if total == 0:
        return torch.zeros_like(power)
    return torch.sort(power, descending=True).values.cumsum(0) / total


def spectral_energy(
    matrix: torch.Tensor,
    k: int,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> float:
    """Share of the squared Frobenius norm held by the ``k`` largest-magnitude coefficients of the orthonormal
    2-D transform of ``matrix`` (rows and columns first reordered by ``row_order``/``col_order``)."""
    if matrix.dim() != 2:
        raise ValueError(f"spectral_energy needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    return energy_shares(matrix, [k], transform, row_order, col_order)[0]


def spectral_flatness(
    matrix: torch.Tensor,
    transform: str = "dct",
    row_order: Optional[torch.Tensor] = None,
    col_order: Optional[torch.Tensor] = None,
) -> float:
    """Geometric over arithmetic mean of the power spectrum: 1 for a perfectly flat spectrum, 0 when any
    coefficient is exactly zero. For reference, i.i.d. Gaussian entries give about exp(-gamma)/2 = 0.28 with the
    DCT (each power is chi-squared with 1 degree of freedom) and exp(-gamma) = 0.56 with the DFT (2 degrees)."""
    return flatness_of(power_spectrum(matrix.double(), transform, row_order, col_order))


def flatness_of(power: torch.Tensor) -> float:
    """Geometric over arithmetic mean of the entries of a power spectrum (0 when all are zero)."""
    power = power.double().flatten()
    mean = power.mean()
    if mean == 0:
        return 0.0
    return float(torch.exp(torch.log(power / mean).mean()))


# ---------------------------------------------------------------------------------------------------------------
# measures of a weight change dW: what `spectral-peft analyze` reports for each matrix

# shares of a matrix's entries at which the energy curves are read
FRACTIONS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
# parameter budgets P = r (M + N): what a rank-r factorisation costs
RANKS = (1, 2, 4, 8, 16, 32, 64)
# the row / column orders :func:`orderings` gives ("prior" only with a prior)
ORDERINGS = ("original", "random", "self", "prior")


def svd_errors(matrix: torch.Tensor, ranks) -> list[float]:
    """Relative Frobenius error of the best rank-r approximation (Eckart-Young), for each r."""
    s2 = torch.linalg.svdvals(matrix.double()).pow(2)
    cumulative = s2.cumsum(0) / s2.sum()
    return [math.sqrt(max(0.0, 1.0 - float(cumulative[min(r, s2.numel()) - 1]))) if r else 1.0 for r in ranks]


def error_from_share(share: float) -> float:
    """Relative Frobenius error of keeping coefficients that hold ``share`` of the energy of an orthonormal
    transform (the best coefficients for a fixed support are the true ones there; the rest is the error)."""
    return math.sqrt(max(0.0, 1.0 - share))


def share_at(power: torch.Tensor, cells: torch.Tensor) -> float:
    """Share of the total of ``power`` (M x N) at ``cells`` ((2, n) rows and columns)."""
    total = power.sum()
    return float(power[cells[0], cells[1]].sum() / total) if total > 0 else 0.0


def top_power_cells(power: torch.Tensor, n: int, transform: str = "dct") -> torch.Tensor:
    """The ``n`` cells of largest ``power`` (a power spectrum, M x N) as (2, n) long. With ``transform="dft"`` only
    one cell of each conjugate pair counts: a real matrix's DFT has ``|F[r, c]| = |F[-r, -c]|``, and both cells give
    the same real atom."""
    m, n_cols = power.shape
    if transform == "dft":
        rows = torch.arange(m)[:, None]
        cols = torch.arange(n_cols)[None, :]
        canonical = rows * n_cols + cols <= ((-rows) % m) * n_cols + (-cols) % n_cols
        power = torch.where(canonical, power, torch.full_like(power, -1.0))
    flat = torch.topk(power.flatten(), n).indices
    return torch.stack([flat // n_cols, flat % n_cols])


def overlap(cells: torch.Tensor, reference: torch.Tensor, n_cols: int) -> int:
    """How many of ``cells`` are also in ``reference`` (both (2, n), distinct cells)."""
    return int(torch.isin(cells[0] * n_cols + cells[1], reference[0] * n_cols + reference[1]).sum())


def mean_distance(cells: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean Euclidean distance, in cells, from each of ``cells`` to the nearest of ``reference``."""
    return float(torch.cdist(cells.T.double(), reference.T.double()).min(dim=1).values.mean())


def orderings(matrix: torch.Tensor, prior: Optional[torch.Tensor], seed: int, refine_passes: int = 3) -> dict:
    """Row and column orders: identity, a seeded random permutation, S2FT's chain on ``matrix``, and on ``prior``."""
    from .s2ft.ordering import nearest_neighbor_orders  # here, not above: the s2ft package imports this module

    m, n = matrix.shape
    generator = torch.Generator().manual_seed(seed)
    orders = {
        "original": (None, None),
        "random": (torch.randperm(m, generator=generator), torch.randperm(n, generator=generator)),
        "self": nearest_neighbor_orders(matrix, refine_passes=refine_passes),
    }
    if prior is not None:
        orders["prior"] = nearest_neighbor_orders(prior, refine_passes=refine_passes)
    return orders


def budget_ks(shape: tuple, fractions=FRACTIONS) -> list[int]:
    """The coefficient counts k that hold each of ``fractions`` of a matrix's entries (at least 1)."""
    return [max(1, round(f * shape[0] * shape[1])) for f in fractions]


def analyze_matrix(dw: torch.Tensor, prior: Optional[torch.Tensor] = None, seed: int = 0, fractions=FRACTIONS,
                   ranks=RANKS) -> dict:
    """Every measure of one weight change ``dW`` (M x N); ``prior`` (same shape) adds the prior ordering."""
    dw = dw.detach().double().cpu()
    if prior is not None and tuple(prior.shape) != tuple(dw.shape):
        raise ValueError(f"prior shape {tuple(prior.shape)} differs from dW {tuple(dw.shape)}")
    ks = budget_ks(dw.shape, fractions)
    orders = orderings(dw, prior.double().cpu() if prior is not None else None, seed)
    energy, flatness, cumulative = {}, {}, {}
    for transform in TRANSFORMS:
        energy[transform], flatness[transform] = {}, {}
        for name, (rows, cols) in orders.items():
            power = power_spectrum(dw, transform, rows, cols)
            cumulative[transform, name] = cumulative_shares(power)
            energy[transform][name] = [float(cumulative[transform, name][k - 1]) for k in ks]
            flatness[transform][name] = flatness_of(power)
    return {
        "shape": list(dw.shape),
        "norm": float(dw.norm()),
        "ks": ks,
        "energy": energy,
        "flatness": flatness,
        "errors": _budget_errors(dw, cumulative, seed, ranks),
        "prior_cosine": float(torch.nn.functional.cosine_similarity(dw.flatten(), prior.double().flatten(), dim=0))
        if prior is not None else None,
    }


def _budget_errors(dw: torch.Tensor, cumulative: dict, seed: int, ranks) -> list[dict]:
    """The approximation errors at each rank's budget P = r (M + N); ``cumulative``: (transform, ordering) -> the
    cumulative energy shares of that spectrum."""
    m, n = dw.shape
    entries = m * n
    original_dct = power_spectrum(dw, "dct")
    generator = torch.Generator().manual_seed(seed + 1)

    def top(transform: str, ordering: str, count: int) -> Optional[float]:
        if (transform, ordering) not in cumulative:
            return None
        return error_from_share(float(cumulative[transform, ordering][count - 1])) if count else 1.0

    errors = []
    usable = [r for r in ranks if r <= min(m, n)]
    for r, svd in zip(usable, svd_errors(dw, usable)):
        budget = min(r * (m + n), entries)
        flat = torch.randperm(entries, generator=generator)[:budget]
        random_cells = torch.stack([flat // n, flat % n])
        errors.append({
            "rank": r, "budget": budget, "svd": svd,
            "dct_top": top("dct", "original", budget),
            "dct_top_3n": top("dct", "original", budget // 3),
            "dct_random": error_from_share(share_at(original_dct, random_cells)),
            "dct_s2ft_self": top("dct", "self", budget),
            "dct_s2ft_prior": top("dct", "prior", budget),
            "dft_top": top("dft", "original", budget),
        })
    return errors


def white_noise_reference(shape: tuple, seed: int = 0, fractions=FRACTIONS) -> dict:
    """Energy curves and flatness of an i.i.d. Gaussian matrix of ``shape``: what a truly flat spectrum gives; and
    after the S2FT ordering computed from the noise itself (the gain an ordering finds where there is no structure)."""
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ks = budget_ks(shape, fractions)
    orders = orderings(noise, None, seed)
    result = {}
    for transform in TRANSFORMS:
        result[transform] = {}
        for name in ("original", "self"):
            power = power_spectrum(noise, transform, *orders[name])
            cumulative = cumulative_shares(power)
            result[transform][name] = {"energy": [float(cumulative[k - 1]) for k in ks], "flatness": flatness_of(power)}
    return result


def compare_locations(layer, adapter_name: str, reference_dw: torch.Tensor, config=None) -> Optional[dict]:
    """Where a spectral adapter put its coefficients, against the top-n energy cells of a reference ``dW`` (the
    full fine-tuning change of the same matrix), in the adapter's own domain (its row/column orders applied).

    DCT adapters only (a DFT location also covers its conjugate cell). For LoCA the initial (random) locations,
    re-drawn from the ``location_seed`` in ``config`` (the adapter's PEFT config), are measured too: where
    learning started.
    """
    from .loca import LocaLinear  # here, not above: the loca package pulls in transformers

    spectrum = layer.spectrum(adapter_name)
    if spectrum.transform != "dct":
        return None
    cells = spectrum.cells.detach().long().cpu()
    n = cells.shape[1]
    m, n_cols = reference_dw.shape
    power = power_spectrum(reference_dw.double().cpu(), "dct",
                           spectrum.row_order.cpu() if spectrum.row_order is not None else None,
                           spectrum.col_order.cpu() if spectrum.col_order is not None else None)
    best = top_power_cells(power, n)
    result = {
        "n": n,
        "overlap": overlap(cells, best, n_cols) / n,
        "expected_random_overlap": n / (m * n_cols),
        "energy_share": share_at(power, cells),
        "top_n_energy_share": share_at(power, best),
        "mean_distance": mean_distance(cells, best),
    }
    if isinstance(layer, LocaLinear) and getattr(config, "location_seed", None) is not None:  # else not redrawable
        initial = layer.initial_cells(adapter_name, n, config).long().cpu()
        result.update({
            "initial_overlap": overlap(initial, best, n_cols) / n,
            "initial_energy_share": share_at(power, initial),
            "initial_mean_distance": mean_distance(initial, best),
            "moved": 1.0 - overlap(cells, initial, n_cols) / n,
        })
    return result
