"""The activation path's sparse matrix Q between the half spectra of a layer's input and output.

The DCT-II of a signal is a twiddled rfft of its even samples followed by its odd samples reversed (Makhoul), and
the inverse DFT of a real signal is the conjugate of its rfft, mirrored. So every input frequency c is a fixed
linear function of the real and imaginary parts of one rfft bin, and every output frequency r feeds one or two bins
of the half spectrum that one irfft turns into output features (the inverse DCT the same way, backwards). The
sparse spectrum in between is then a single sparse real (2 Mh) x (2 Nh) matrix Q (Mh = M // 2 + 1, Nh likewise)
with at most 8 entries per coefficient, and a step is: reorder, rfft, sparse product, irfft, reorder.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..transforms import dct_scale
from .spectrum import Spectrum, stencil_points


def input_map(size: int, transform: str, dtype: torch.dtype, device: torch.device):
    """Input frequency c -> (its rfft bin j, the (channels, 2) map from (Re, Im) of bin j to the spectrum at c)."""
    c = torch.arange(size, dtype=torch.float64)
    mirrored = c > size // 2  # bins above the middle are conjugates of bins below it
    bin_ = torch.where(mirrored, size - c, c).long()
    sign = 1.0 - 2.0 * mirrored.double()
    if transform == "dct":  # s_c Re(W_c V_c), W_c = exp(-i pi c / 2N)
        scale, angle = dct_scale(size), math.pi * c / (2 * size)
        linear = torch.stack([scale * torch.cos(angle), sign * scale * torch.sin(angle)], dim=-1)[:, None, :]
    else:  # ifft(x)_c = conj(rfft(x)_c) / N
        linear = torch.zeros(size, 2, 2, dtype=torch.float64)
        linear[:, 0, 0] = 1.0 / size
        linear[:, 1, 1] = -sign / size
    return bin_.to(device), linear.to(device=device, dtype=dtype)


def output_map(size: int, transform: str, dtype: torch.dtype, device: torch.device):
    """Output frequency r -> two (half-spectrum bin k, (2, channels) map) terms; an unused term has a zero map."""
    r = torch.arange(size, dtype=torch.float64)
    first = r <= size // 2
    if transform == "dct":
        # U_k = conj(W_k) (c_k - i c_{M-k}) with c = z / s and c_M = 0: r feeds bin r and bin M - r
        bin2 = size - r
        second = (r >= 1) & (bin2 <= size // 2)
        scale = dct_scale(size)
        cos1, sin1 = torch.cos(math.pi * r / (2 * size)), torch.sin(math.pi * r / (2 * size))
        cos2, sin2 = torch.cos(math.pi * bin2 / (2 * size)), torch.sin(math.pi * bin2 / (2 * size))
        map1 = torch.stack([cos1, sin1], dim=-1)[..., None] / scale[:, None, None]
        map2 = torch.stack([sin2, -cos2], dim=-1)[..., None] / scale[:, None, None]  # conj(W) * (-i)
    else:
        # Re(ifft(z)) = irfft(H) with H_k = (z_k + conj(z_{-k})) / 2: r feeds bin r and bin (M - r) mod M
        bin2 = (size - r) % size
        second = bin2 <= size // 2
        map1 = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64).expand(size, 2, 2).clone()
        map2 = torch.tensor([[0.5, 0.0], [0.0, -0.5]], dtype=torch.float64).expand(size, 2, 2).clone()
    map1 = map1 * first[:, None, None]
    map2 = map2 * second[:, None, None]
    bin1, bin2 = torch.where(first, r, 0.0).long(), torch.where(second, bin2, 0.0).long()
    return tuple(t.to(device) for t in (bin1, bin2)) + tuple(t.to(device=device, dtype=dtype) for t in (map1, map2))


def half_spectrum_weights(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per real entry of a half spectrum: the adjoint weights of irfft (c_k / M, zero for the imaginary parts it
    ignores) and of rfft (N * d_k with d = 1 at the ends, 1/2 in the middle), so both adjoints are plain FFTs."""
    bins = size // 2 + 1
    k = torch.arange(bins)
    ends = (k == 0) | ((k == size // 2) & (size % 2 == 0))
    irfft_adjoint = torch.where(ends, 1.0, 2.0).to(torch.float64) / size
    irfft_adjoint = torch.stack([irfft_adjoint, torch.where(ends, 0.0, irfft_adjoint)], dim=-1)
    rfft_adjoint = torch.where(ends, 1.0, 0.5).to(torch.float64) * size
    rfft_adjoint = torch.stack([rfft_adjoint, rfft_adjoint], dim=-1)
    return irfft_adjoint.reshape(-1).to(device, dtype), rfft_adjoint.reshape(-1).to(device, dtype)


def q_entries(spec: Spectrum, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype):
    """The entries of Q that spectrum cells (rows, cols) make: flat position p * 2Nh + q, the factor each is
    scaled by (times the coefficient and the scaling), and which pair it belongs to."""
    device = rows.device
    in_bin, in_map = input_map(spec.in_features, spec.transform, dtype, device)
    bin1, bin2, map1, map2 = output_map(spec.out_features, spec.transform, dtype, device)
    width = 2 * (spec.in_features // 2 + 1)
    q = (2 * in_bin[cols])[:, None, None] + torch.arange(2, device=device)[None, None, :]
    a_in = in_map[cols]
    flats, factors = [], []
    for bins, maps in ((bin1, map1), (bin2, map2)):
        p = (2 * bins[rows])[:, None, None] + torch.arange(2, device=device)[None, :, None]
        flats.append((p * width + q).reshape(rows.numel(), 4))
        factors.append(torch.bmm(maps[rows], a_in).reshape(rows.numel(), 4))
    flat, factor = torch.cat(flats, dim=1).reshape(-1), torch.cat(factors, dim=1).reshape(-1)
    pair = torch.arange(rows.numel(), device=device).repeat_interleave(8)
    keep = factor != 0
    return flat[keep], factor[keep], pair[keep]


class SparsityPattern:
    """Where a CSR matrix's entries lie, from flat positions ``row * width + col`` (duplicates are summed): built
    once, filled with values on each call."""

    def __init__(self, flat: torch.Tensor, shape: tuple[int, int], transpose: bool = False):
        rows, cols = flat // shape[1], flat % shape[1]
        if transpose:
            rows, cols, shape = cols, rows, (shape[1], shape[0])
        positions, self.slot = torch.unique(rows * shape[1] + cols, return_inverse=True)
        self.crow = torch.searchsorted(positions // shape[1], torch.arange(shape[0] + 1, device=flat.device))
        self.col = positions % shape[1]
        self.shape = shape

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        summed = values.new_zeros(self.col.numel()).index_add_(0, self.slot, values)
        with warnings.catch_warnings():  # torch calls its sparse CSR support beta; it is tested here against dense
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.crow, self.col, summed, self.shape, check_invariants=False)


class Stencil:
    """K at the stencil points (:func:`stencil_points`) from the half spectra of the output gradient (left) and
    the input (right): ``K = sum of factor * <left[:, p], right[:, q]>`` over each point's Q entries at ``p * width +
    q``. Only the distinct positions are sampled; ``columns`` are the input spectrum's rows they touch, all that S2FT
    keeps of its input (its cells crowd low frequencies)."""

    def __init__(self, entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: int, spec: Spectrum,
                 shape: tuple[int, int]):
        flat, factor, self.point = entries
        rows, width = shape
        self.size = size
        self.weight = factor * half_spectrum_weights(spec.out_features, factor.dtype, factor.device)[0][flat // width]
        positions, self.position = torch.unique(flat, return_inverse=True)
        self.columns, col_index = torch.unique(positions % width, return_inverse=True)
        # positions in the full spectra and with the input's reduced to ``columns``: both keep the positions' order,
        # so the sampled values come out in it
        ones = torch.ones_like(positions, dtype=factor.dtype)
        self._patterns = {False: SparsityPattern(positions, (rows, width)).matrix(ones),
                          True: SparsityPattern(positions // width * self.columns.numel() + col_index,
                                                (rows, self.columns.numel())).matrix(ones)}

    def sampled_dots(self, left: torch.Tensor, right: torch.Tensor, right_is_columns: bool) -> torch.Tensor:
        """The sampled dots of one block of rows, from feature-major (channels, rows) half spectra (``right``
        reduced to ``columns`` or not). The kernel reads only the rows it samples, each a contiguous run of tokens,
        so the spectra are used as they lie: gathering the touched rows first (most of a narrow layer's) costs
        twice what the dots do."""
        return torch.sparse.sampled_addmm(self._patterns[right_is_columns], left, right.t(), beta=0.0).values()

    def spectral_grad(self, dots: torch.Tensor, scaling: float) -> torch.Tensor:
        per_entry = self.weight * dots[self.position] * scaling
        return per_entry.new_zeros(self.size).index_add_(0, self.point, per_entry)


class Structure:
    """What a spectrum's cells fix for the activation path: Q's entries and sparsity, its adjoint's (backward, on
    first use) and the coefficient gradient's stencil. Kept with the cells' :class:`~.cache.Placement`."""

    def __init__(self, spec: Spectrum, dtype: torch.dtype):
        m, n = spec.out_features, spec.in_features
        self.shape = (2 * (m // 2 + 1), 2 * (n // 2 + 1))
        self.entries = q_entries(spec, spec.cells[0], spec.cells[1], dtype)  # (flat, factor, pair)
        self.pattern = SparsityPattern(self.entries[0], self.shape)
        self._adjoint = None
        self._stencils: dict = {}

    def adjoint(self, spec: Spectrum) -> tuple[SparsityPattern, torch.Tensor]:
        """Q^T's sparsity and the weight of each entry: the adjoints of irfft and rfft are weighted rffts and
        irffts, and those weights (of the output by Q's row, of the input by its column) are folded into Q's
        entries, so the (T, 2 Mh) rfft of the output gradient is used as it comes."""
        if self._adjoint is None:
            flat, factor, _ = self.entries
            irfft_adjoint = half_spectrum_weights(spec.out_features, factor.dtype, factor.device)[0]
            rfft_adjoint = half_spectrum_weights(spec.in_features, factor.dtype, factor.device)[1]
            weight = irfft_adjoint[flat // self.shape[1]] * rfft_adjoint[flat % self.shape[1]]
            self._adjoint = (SparsityPattern(flat, self.shape, transpose=True), weight)
        return self._adjoint

    def stencil(self, spec: Spectrum) -> Optional[Stencil]:
        """The stencil of the gradients that train, kept for each choice of what trains: the cells stand for many
        steps (LoCA's locations move a cell only now and then), and a location phase's stencil of five times the
        points costs about what a 1024-wide layer's transforms do to build."""
        key = (spec.train_coefficients, spec.trains_locations)
        if key not in self._stencils:
            points = stencil_points(spec)
            if points is None:
                stencil = None
            elif key == (True, False):  # the cells alone: Q's own entries
                stencil = Stencil(self.entries, spec.cells.shape[1], spec, self.shape)
            else:
                stencil = Stencil(q_entries(spec, *points, self.entries[1].dtype), points[0].numel(), spec,
                                  self.shape)
            self._stencils[key] = stencil
        return self._stencils[key]
