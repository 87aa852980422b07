"""The sparse-spectrum update ``dW = scaling * P_row^T (T_M^T S T_N) P_col^T`` and its three ways of computing.

``S`` is an M x N spectrum with ``n`` non-zero coefficients ``a_i`` at cells ``(r_i, c_i)``; ``T`` is the
orthonormal DCT-II (``transform="dct"``) or the inverse DFT with the real part taken (``"dft"``, FourierFT's
convention: ``dW = scaling * Re(ifft2(S))``); ``P_row``/``P_col`` are optional orderings (S2FT).

* The activation path (wide layers on CPU) applies the update to activations: a real FFT of the input features,
  one sparse product into the output's half spectrum, an inverse real FFT. No M x N tensor is formed.
* The dense path builds ``dW`` (merging; small layers with many tokens; the layer may add it to its frozen weight so
  that its own product carries it).
* The factored path multiplies by the coefficients' basis vectors, two products as thin as their number (layers
  on a GPU, where the cost model finds them cheaper than the dense path).

All three give coefficient gradients and LoCA's finite-difference location gradients from the spectral gradient
``K = dL/dS`` evaluated at each location and its four neighbours: the dense path indexes ``K``, the activation
path samples it from the transformed input and output gradient, the factored path multiplies both by the basis
vectors of those points.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .transforms import COMPUTE_DTYPES, dct_scale, idct, makhoul_reorder

TRANSFORMS = ("dct", "dft")


@dataclass
class Spectrum:
    """Everything one adapter of one layer contributes to ``dW`` (``M`` outputs, ``N`` inputs)."""

    coefficients: torch.Tensor  # (n,) float
    cells: torch.Tensor  # (2, n) long: row (output frequency) and column (input frequency) of each coefficient
    out_features: int
    in_features: int
    scaling: float
    transform: str = "dct"
    row_order: Optional[torch.Tensor] = None  # (M,) long permutation, S2FT
    col_order: Optional[torch.Tensor] = None  # (N,) long permutation, S2FT
    locations: Optional[torch.Tensor] = None  # (2, n) float parameter that receives location gradients (LoCA)
    train_coefficients: bool = True
    train_locations: bool = False


# --------------------------------------------------------------------------------------------------------------
# Gradients from the spectral gradient K = dL/dS


def _stencil_points(spec: Spectrum) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Every point of ``K`` the gradients need, as (rows, cols), to evaluate in one call: the cells (when the
    coefficients train), then their four neighbours (when the locations train); None when nothing trains."""
    rows, cols = spec.cells[0], spec.cells[1]
    points = [(rows, cols)] if spec.train_coefficients else []
    if spec.locations is not None and spec.train_locations:
        m, n = spec.out_features, spec.in_features
        points += [
            ((rows + 1).clamp(max=m - 1), cols), ((rows - 1).clamp(min=0), cols),
            (rows, (cols + 1).clamp(max=n - 1)), (rows, (cols - 1).clamp(min=0)),
        ]
    if not points:
        return None
    return torch.cat([r for r, _ in points]), torch.cat([c for _, c in points])


def _stencil_gradients(
    spectral_grad: Optional[torch.Tensor], spec: Spectrum
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Coefficient gradient ``K[r_i, c_i]`` and LoCA's location gradient from ``spectral_grad``, ``K`` at
    :func:`_stencil_points` (None where there are none).

    The location gradient is the linearised central difference of moving coefficient i by one cell:
    ``dL/dr_i = a_i (K[r_i+1, c_i] - K[r_i-1, c_i]) / 2`` and likewise along columns; neighbour indices are clamped
    at the borders.
    """
    rows = spec.cells[0]
    train_locations = spec.locations is not None and spec.train_locations
    values = [] if spectral_grad is None else list(spectral_grad.split(rows.numel()))
    coef_grad = values.pop(0).to(spec.coefficients.dtype) if spec.train_coefficients else None
    loc_grad = None
    if train_locations:
        down, up, right, left = values
        half_a = spec.coefficients.detach().to(down.dtype) / 2
        loc_grad = (torch.stack([down - up, right - left]) * half_a).to(spec.locations.dtype)
    elif spec.locations is not None:
        # A zero gradient, never None: DistributedDataParallel expects every trainable parameter to get one.
        loc_grad = torch.zeros_like(spec.locations)
    if coef_grad is None and spec.coefficients.requires_grad:
        coef_grad = torch.zeros_like(spec.coefficients)
    return coef_grad, loc_grad


class _ScatterSpectrum(torch.autograd.Function):
    """The dense M x N spectrum ``S`` with the coefficients at their cells (dense path)."""

    @staticmethod
    def forward(ctx, coefficients, locations, spec: Spectrum):
        ctx.spec = spec
        s = coefficients.new_zeros(spec.out_features, spec.in_features)
        return s.index_put_((spec.cells[0], spec.cells[1]), coefficients)

    @staticmethod
    def backward(ctx, k):
        points = _stencil_points(ctx.spec)
        return (*_stencil_gradients(None if points is None else k[points], ctx.spec), None)


# --------------------------------------------------------------------------------------------------------------
# Activation path: real FFTs on both sides and one sparse matrix between their half spectra
#
# The DCT-II of a signal is a twiddled rfft of its even samples followed by its odd samples reversed (Makhoul), and
# the inverse DFT of a real signal is the conjugate of its rfft, mirrored. So every input frequency c is a fixed
# linear function of the real and imaginary parts of one rfft bin, and every output frequency r feeds one or two bins
# of the half spectrum that one irfft turns into output features (the inverse DCT the same way, backwards). The
# sparse spectrum in between is then a single sparse real (2 Mh) x (2 Nh) matrix Q (Mh = M // 2 + 1, Nh likewise)
# with at most 8 entries per coefficient, and a step is: reorder, rfft, sparse product, irfft, reorder. No full-size
# complex FFT, twiddle multiply or reorder copy is left in the loop.


@functools.lru_cache(maxsize=256)
def _input_map(size: int, transform: str, dtype: torch.dtype, device: torch.device):
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


@functools.lru_cache(maxsize=256)
def _output_map(size: int, transform: str, dtype: torch.dtype, device: torch.device):
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


@functools.lru_cache(maxsize=256)
def _half_spectrum_weights(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def _entries(spec: Spectrum, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype):
    """The entries of Q that spectrum cells (rows, cols) make: flat position p * 2Nh + q, the factor each is
    scaled by (times the coefficient and the scaling), and which pair it belongs to."""
    device = rows.device
    in_bin, in_map = _input_map(spec.in_features, spec.transform, dtype, device)
    bin1, bin2, map1, map2 = _output_map(spec.out_features, spec.transform, dtype, device)
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


class _SparsityPattern:
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


class _Stencil:
    """K at the stencil points (:func:`_stencil_points`) from the half spectra of the output gradient (left) and
    the input (right): ``K = sum of factor * <left[:, p], right[:, q]>`` over each point's Q entries at ``p * width +
    q``. Only the distinct positions are sampled, and only the spectrum columns they touch are gathered (a few
    hundred of a wide layer's thousands): ``columns``, which is also all that S2FT keeps of its input."""

    def __init__(self, entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: int, spec: Spectrum,
                 width: int):
        flat, factor, self.point = entries
        self.size = size
        self.weight = factor * _half_spectrum_weights(spec.out_features, factor.dtype, factor.device)[0][flat // width]
        pattern, self.position = torch.unique(flat, return_inverse=True)
        self.used_rows, row_index = torch.unique(pattern // width, return_inverse=True)
        self.columns, col_index = torch.unique(pattern % width, return_inverse=True)
        # the compact positions keep the pattern's order, so the sampled values come out in it
        compact = row_index * self.columns.numel() + col_index
        self.compact = _SparsityPattern(compact, (self.used_rows.numel(), self.columns.numel())).matrix(
            torch.ones_like(compact, dtype=factor.dtype))

    def sampled_dots(self, left: torch.Tensor, right: torch.Tensor, right_is_columns: bool) -> torch.Tensor:
        """The sampled dots of one block of rows (``right`` already reduced to ``columns`` or not)."""
        right = right if right_is_columns else right.index_select(1, self.columns)
        return torch.sparse.sampled_addmm(self.compact, left.index_select(1, self.used_rows).t(), right,
                                          beta=0.0).values()

    def spectral_grad(self, dots: torch.Tensor, scaling: float) -> torch.Tensor:
        per_entry = self.weight * dots[self.position] * scaling
        return per_entry.new_zeros(self.size).index_add_(0, self.point, per_entry)


class _Structure:
    """What a spectrum's cells fix for the activation path, kept until they move (:func:`_structure`): Q's
    entries and sparsity, its adjoint's (backward, on first use) and the coefficient gradient's stencil."""

    def __init__(self, spec: Spectrum, dtype: torch.dtype):
        m, n = spec.out_features, spec.in_features
        self.shape = (2 * (m // 2 + 1), 2 * (n // 2 + 1))
        self.entries = _entries(spec, spec.cells[0], spec.cells[1], dtype)  # (flat, factor, pair)
        self.pattern = _SparsityPattern(self.entries[0], self.shape)
        self._adjoint = self._cells_stencil = None

    def adjoint(self, spec: Spectrum) -> tuple[_SparsityPattern, torch.Tensor]:
        """Q^T's sparsity and the weight of each entry: the adjoints of irfft and rfft are weighted rffts and
        irffts, and those weights (of the output by Q's row, of the input by its column) are folded into Q's
        entries, so the (T, 2 Mh) rfft of the output gradient is used as it comes."""
        if self._adjoint is None:
            flat, factor, _ = self.entries
            irfft_adjoint = _half_spectrum_weights(spec.out_features, factor.dtype, factor.device)[0]
            rfft_adjoint = _half_spectrum_weights(spec.in_features, factor.dtype, factor.device)[1]
            weight = irfft_adjoint[flat // self.shape[1]] * rfft_adjoint[flat % self.shape[1]]
            self._adjoint = (_SparsityPattern(flat, self.shape, transpose=True), weight)
        return self._adjoint

    def stencil(self, spec: Spectrum) -> Optional[_Stencil]:
        """The stencil of the gradients that train; kept when it is the cells alone (the coefficients train, the
        locations do not), built anew for LoCA's location phase (five times the points, rarely repeated)."""
        points = _stencil_points(spec)
        if points is None:
            return None
        if spec.locations is not None and spec.train_locations:
            return _Stencil(_entries(spec, *points, self.entries[1].dtype), points[0].numel(), spec, self.shape[1])
        if self._cells_stencil is None:
            self._cells_stencil = _Stencil(self.entries, spec.cells.shape[1], spec, self.shape[1])
        return self._cells_stencil


_PER_CELLS: dict = {}  # (id(cells), what) -> (weak reference to the cells, key, value, orders)


def _per_cells(spec: Spectrum, what: str, key: tuple, build: Callable[[], object]):
    """What ``build`` makes of ``spec``'s cells and orders, kept under ``what`` and ``key``: rebuilt when the cells
    or S2FT's orders change (in place: their version counters move; or are replaced) or the key does, and dropped
    with the cells."""
    cells, orders = spec.cells, (spec.row_order, spec.col_order)
    versions = tuple((id(order), order._version) if order is not None else None for order in orders)
    slot, key = (id(cells), what), (cells._version, *versions, *key)
    cached = _PER_CELLS.get(slot)
    if cached is not None and cached[0]() is cells and cached[1] == key:
        return cached[2]
    value = build()
    # the orders are held with the entry, so that their ids in the key stay theirs
    _PER_CELLS[slot] = (weakref.ref(cells, functools.partial(_forget_per_cells, slot)), key, value, orders)
    return value


def _forget_per_cells(slot: tuple, reference: weakref.ref) -> None:
    entry = _PER_CELLS.get(slot)
    if entry is not None and entry[0] is reference:  # not an entry of newer cells that took the same id
        del _PER_CELLS[slot]


def _structure(spec: Spectrum, dtype: torch.dtype) -> _Structure:
    """The activation path's structure of ``spec``'s cells (:func:`_per_cells`)."""
    key = (spec.out_features, spec.in_features, spec.transform, dtype)
    return _per_cells(spec, "structure", key, lambda: _Structure(spec, dtype))


def _times_transposed(q: torch.Tensor, dense: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    """``dense @ q^T`` for a (T, K) row-major ``dense`` and a (J, K) CSR ``q``: a (T, J) row-major result.

    Computed as ``q @ dense^T`` into the transposed view of the result, so the sparse kernel reads and writes the
    activations in their own layout; ``dense @ csr`` transposes both operands and copies the result back (1.5-5x
    slower on this project's 2-core CPU, from a block of rows to a whole batch).
    """
    out = scratch("product", dense.shape[0], q.shape[0], dense.dtype)
    torch.addmm(out.t(), q, dense.t(), beta=0.0, out=out.t())
    return out


# Tokens are transformed a block of rows at a time on a CPU, so a step's temporaries (a few block x features
# tensors) stay in cache between the reorder, FFT, sparse product, inverse FFT and sum; whole-batch temporaries make
# every one of those passes go to memory (about 3x the time on a 2048-wide layer at 1024 tokens). A block has at least
# _BLOCK_MIN_ROWS rows, though: each operation has a fixed cost per call (torch's MKL backend plans every FFT anew),
# which 46-row blocks of a 5632-wide layer paid 22 times a call. 128 rows take 0.87-0.89x the time there and
# 0.87-0.94x on 11008-wide layers, and change nothing at 2048 wide (benchmarks/block_rows.py, 2-core CPU).
_BLOCK_ELEMENTS = 1 << 18
_BLOCK_MIN_ROWS = 128


def _row_blocks(tokens: int, width: int, device: torch.device) -> list[slice]:
    if device.type != "cpu":  # one launch per operation beats many small ones on an accelerator
        return [slice(0, tokens)]
    rows = max(_BLOCK_MIN_ROWS, _BLOCK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + rows, tokens)) for start in range(0, tokens, rows)]


class _SpectralActivationProduct(torch.autograd.Function):
    """``x @ dW^T`` for x of shape (T, N), in the compute dtype; see the section comment.

    Activations stay (T, features) row-major throughout, and are processed in blocks of rows (``_row_blocks``).
    """

    @staticmethod
    def forward(ctx, x, coefficients, locations, spec: Spectrum, gathers: "_Gathers", anchor: "_Anchor", out):
        m, n = spec.out_features, spec.in_features
        structure = _structure(spec, x.dtype)
        _, factor, pair = structure.entries
        values = factor * coefficients.detach().to(x.dtype)[pair] * spec.scaling
        q = structure.pattern.matrix(values)  # half_out = half_in @ Q^T
        # Backward needs the input only through its half spectrum, at the columns its gradient points touch. Where
        # other layers share that spectrum it is kept whole (one input-sized tensor for them all); S2FT's per-layer
        # column orders make it the layer's own, so only those columns are kept (its cells crowd low frequencies).
        # In inference nothing is kept and each block transforms its own rows.
        shared = anchor.grad_enabled and spec.col_order is None
        half_in = _SHARED_INPUT.get(x, spec, gathers.col_gather, anchor.tensor) if shared else None
        kept = columns = None
        if anchor.grad_enabled and not shared:
            stencil = structure.stencil(spec)  # the cells' own (S2FT has no locations): kept with the structure
            columns = stencil.columns if stencil is not None else structure.entries[0][:0]
            kept = x.new_empty(x.shape[0], columns.numel())
        result = x.new_empty(x.shape[0], m) if out is None else out
        scratch = _block_scratch(x.device)
        for rows in _row_blocks(x.shape[0], max(m, n), x.device):
            block = half_in[rows] if shared else _half_spectrum(x[rows], gathers.col_gather, scratch)
            if kept is not None:
                torch.index_select(block, 1, columns, out=kept[rows])
            features = _irfft_half(_times_transposed(q, block, scratch), m, scratch)
            if out is None:
                gathers.row_gather(features, out=result[rows])
            else:  # added into the base layer's output where it lies: no (T, M) copy for the reorder nor the sum
                gathers.row_add(result[rows], features.to(out.dtype))
        if anchor.grad_enabled:
            ctx.save_for_backward(half_in if shared else kept)
        ctx.spec, ctx.gathers, ctx.structure, ctx.values = spec, gathers, structure, values
        ctx.kept_columns = not shared
        if out is not None:
            ctx.mark_dirty(out)
        return result

    @staticmethod
    def backward(ctx, grad_y):
        (half_in,) = ctx.saved_tensors
        spec, gathers, structure = ctx.spec, ctx.gathers, ctx.structure
        stencil = structure.stencil(spec)  # a location phase's is built here, not held since forward
        m, n = spec.out_features, spec.in_features
        grad_y = grad_y.reshape(-1, m)
        grad_x = adjoint = None
        if ctx.needs_input_grad[0]:
            pattern, weight = structure.adjoint(spec)
            adjoint = pattern.matrix(ctx.values * weight)
            grad_x = half_in.new_empty(grad_y.shape[0], n)
        dots, scratch = None, _block_scratch(half_in.device)
        for rows in _row_blocks(grad_y.shape[0], max(m, n), half_in.device):
            # (rows, 2 Mh)
            raw_grad_half_out = _half_spectrum(grad_y[rows].to(half_in.dtype), gathers.row_scatter, scratch)
            if grad_x is not None:
                features = _irfft_half(_times_transposed(adjoint, raw_grad_half_out, scratch), n, scratch)
                gathers.col_scatter(features, out=grad_x[rows])
            if stencil is not None:  # K = dL/dS at the stencil points, summed over the blocks
                block = stencil.sampled_dots(raw_grad_half_out, half_in[rows], ctx.kept_columns)
                dots = block if dots is None else dots.add_(block)
        spectral_grad = stencil.spectral_grad(dots, spec.scaling) if stencil is not None else None
        coef_grad, loc_grad = _stencil_gradients(spectral_grad, spec)
        # the base output it was added into passes its gradient through
        return grad_x, coef_grad, loc_grad, None, None, None, grad_y if ctx.needs_input_grad[6] else None


Reorder = Callable[..., torch.Tensor]  # (x, out=None) -> x reordered along its last axis (into out if given)


def _identity(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return x if out is None else out.copy_(x)


def _gather(order: torch.Tensor) -> Reorder:
    # torch.gather with the order broadcast over the rows: one pass, faster than index_select along the last axis
    # (about 45 against 75 us for a 128 x 2048 block on this project's 2-core CPU; benchmarks/activation_pieces.py)
    return lambda x, out=None: torch.gather(x, -1, order.expand(x.shape), out=out)


def _scatter_add(order: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``target[..., order[j]] += t[..., j]`` in place."""
    return lambda target, t: target.scatter_add_(-1, order.expand(t.shape), t)


# An arbitrary order (S2FT's) read from a tensor in memory defeats the hardware's prefetching, which Makhoul's two
# strided streams do not: a layer's input and output gradient are read in sequence and scattered into a block in
# cache, and the output is added to in sequence from a gather of the block. An S2FT layer of the Llama-style shapes
# at 1024 tokens: 0.85-0.93 x the inference time of gathering from memory and scatter-adding into it, the training
# step within noise (benchmarks/reorder_forms.py); with Makhoul's order alone these forms take 1.01-1.05 x, so it
# keeps the gather.


def _scatter(inverse: torch.Tensor) -> Reorder:
    """``out[..., inverse[i]] = x[..., i]``: the reorder ``_gather(order)`` with x read in sequence."""
    return lambda x, out=None: (torch.empty_like(x) if out is None else out).scatter_(-1, inverse.expand(x.shape), x)


def _gather_add(inverse: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``target[..., i] += t[..., inverse[i]]`` in place: ``_scatter_add(order)`` with target written in sequence."""
    def add(target: torch.Tensor, t: torch.Tensor) -> None:
        reordered = _block_scratch(t.device)("reordered back", t.shape[0], t.shape[1], t.dtype)
        target.add_(torch.gather(t, -1, inverse.expand(t.shape), out=reordered))
    return add


@functools.lru_cache(maxsize=64)
def _makhoul_orders(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Makhoul's reorder as indices, and its inverse (kept: a layer call's fixed cost is what generating token by
    token pays)."""
    order = makhoul_reorder(torch.arange(size, device=device))
    return order, _inverse_order(order)


@dataclass
class _Gathers:
    """Feature reorders around the FFTs, along the last axis: each composes a method's ordering (S2FT) with the
    transform's own (Makhoul's for the DCT, none for the DFT)."""

    col_gather: Reorder  # x -> the rfft's input
    col_scatter: Reorder  # its inverse
    row_gather: Reorder  # the irfft's output -> y
    row_scatter: Reorder  # its inverse
    row_add: Callable[[torch.Tensor, torch.Tensor], None]  # (target, irfft's output): target += row_gather(output)


def _gathers(spec: Spectrum, device: torch.device) -> _Gathers:
    """The reorders of ``spec`` (:func:`_per_cells`: S2FT's composed orders and their inverses are a few small
    operations, which a layer call on one token would otherwise pay every time)."""
    key = (spec.out_features, spec.in_features, spec.transform, device)
    return _per_cells(spec, "gathers", key, lambda: _build_gathers(spec, device))


def _build_gathers(spec: Spectrum, device: torch.device) -> _Gathers:
    def reorders(order: Optional[torch.Tensor], size: int) -> tuple[Reorder, Reorder, Callable]:
        """(before the rfft, its inverse, adding the inverse into a target) for a method's ``order``."""
        if order is None and spec.transform == "dft":
            return _identity, _identity, torch.Tensor.add_
        if order is None:
            order, inverse = _makhoul_orders(size, device)
            return _gather(order), _gather(inverse), _scatter_add(order)
        order = order.to(device)
        if spec.transform == "dct":  # the ordering first, then Makhoul's
            order = order[_makhoul_orders(size, device)[0]]
        inverse = _inverse_order(order)
        return _scatter(inverse), _gather(inverse), _gather_add(inverse)

    col_gather, col_scatter, _ = reorders(spec.col_order, spec.in_features)
    # rows run the other way: the irfft's output goes back through the inverse (the output gradient forwards)
    row_scatter, row_gather, row_add = reorders(spec.row_order, spec.out_features)
    return _Gathers(col_gather, col_scatter, row_gather, row_scatter, row_add)


class _Scratch:
    """Buffers that blocks of rows reuse: fresh memory is faulted in page by page on first touch, which costs about
    as much as the FFTs when each block allocates its own temporaries (and after a training step's large frees the
    allocator may hand back memory that is fresh again). See :func:`_block_scratch`."""

    def __init__(self, device: torch.device):
        self.device, self.buffers = device, {}

    def __call__(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, cols, dtype)  # one buffer per use and width: layers of different widths alternate
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self.buffers[key] = torch.empty(rows, cols, dtype=dtype, device=self.device)
        return buffer[:rows]


_THREAD_SCRATCH = threading.local()


def _block_scratch(device: torch.device) -> _Scratch:
    """The scratch for one call's blocks. On a CPU one per thread, kept between calls (blocks hold about 2^18
    elements, so its few buffers take a few MB; nothing in them outlives a call, and calls in one thread never
    overlap); elsewhere a call's own (one block is the whole batch there, and the device's caching allocator
    already reuses memory)."""
    if device.type != "cpu":
        return _Scratch(device)
    scratch = getattr(_THREAD_SCRATCH, "scratch", None)
    if scratch is None:
        scratch = _THREAD_SCRATCH.scratch = _Scratch(device)
    return scratch


def _half_spectrum(x: torch.Tensor, reorder: Reorder, scratch: Optional[_Scratch] = None) -> torch.Tensor:
    """(T, N) features -> (T, 2 Nh) real and imaginary parts of the rfft of the reordered features (by blocks of
    rows, so the reordered copy never leaves the cache). With ``scratch`` (a block's call) the result is its buffer,
    valid until that buffer's next use; without, a tensor of its own (a whole batch kept for backward)."""
    shape, dtype = (x.shape[0], x.shape[1] // 2 + 1), x.dtype.to_complex()
    if scratch is None:
        spectrum, work = torch.empty(shape, dtype=dtype, device=x.device), _block_scratch(x.device)
    else:
        spectrum, work = scratch("spectrum", *shape, dtype), scratch
    for rows in _row_blocks(x.shape[0], x.shape[1], x.device):
        reordered = x[rows] if reorder is _identity else reorder(
            x[rows], out=work("reordered", rows.stop - rows.start, x.shape[1], x.dtype))
        torch.fft.rfft(reordered, dim=-1, out=spectrum[rows])
    return torch.view_as_real(spectrum).reshape(x.shape[0], -1)


def _irfft_half(half: torch.Tensor, size: int, scratch: Optional[_Scratch] = None) -> torch.Tensor:
    """(T, 2 Mh) real and imaginary parts of a half spectrum -> (T, M) by the inverse real FFT (into a scratch
    buffer if given)."""
    out = scratch("features", half.shape[0], size, half.dtype) if scratch is not None else None
    return torch.fft.irfft(torch.view_as_complex(half.reshape(half.shape[0], -1, 2)), n=size, dim=-1, out=out)


@dataclass
class _Anchor:
    """The tensor a layer was called with (hidden from autograd): the shared half spectrum lives while it does;
    and whether gradients are on (autograd runs a Function's forward without them, and without saying so)."""

    tensor: torch.Tensor
    grad_enabled: bool


class _SharedHalfSpectrum:
    """The half spectrum of the last input transformed without a layer's own ordering.

    Layers that read one input (query, key and value; gate and up) then transform it once. The entry is keyed by
    the input's memory (only while that is the memory of the tensor the layer was called with, which is alive),
    version counter, shape, strides and dtype, so it is never stale; it is dropped when that tensor is freed (in
    training backward keeps the spectrum anyway).
    """

    def __init__(self):
        self.entry = None  # (key, half spectrum, weak reference to the input); replaced as one, for threads

    def get(self, x: torch.Tensor, spec: Spectrum, gather: Reorder, anchor: torch.Tensor):
        if x.untyped_storage().data_ptr() != anchor.untyped_storage().data_ptr():
            # x is a cast or copy of the input: its memory is freed and reused, so it cannot key the entry
            return _half_spectrum(x, gather)
        key = (x.data_ptr(), x._version, tuple(x.shape), x.stride(), x.dtype, x.device, spec.transform)
        entry = self.entry
        if entry is not None and entry[0] == key and entry[2]() is not None:
            return entry[1]
        half = _half_spectrum(x, gather)
        self.entry = (key, half, weakref.ref(anchor, functools.partial(self._drop, key)))
        return half

    def _drop(self, key, _reference) -> None:
        entry = self.entry
        if entry is not None and entry[0] == key:
            self.entry = None


_SHARED_INPUT = _SharedHalfSpectrum()


def _inverse_order(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in COMPUTE_DTYPES else torch.float32


def apply_delta(x: torch.Tensor, spec: Spectrum, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ dW^T`` through the transforms (activation path), in the input's dtype.

    With ``out`` (a fresh (tokens, M) tensor that nothing else holds or views, such as a layer's own product) the
    update is added into it in place and ``out`` is returned.
    """
    lead = x.shape[:-1]
    if out is not None and (out.shape != (math.prod(lead), spec.out_features) or not out.is_contiguous()
                            or out._base is not None):
        raise ValueError(f"apply_delta: out must be a contiguous ({math.prod(lead)}, {spec.out_features}) tensor "
                         "that is not a view")
    if x.numel() == 0:  # an empty batch (torch's FFTs refuse empty input)
        return x.new_zeros(*lead, spec.out_features) if out is None else out
    work = x.reshape(-1, spec.in_features).to(_compute_dtype(x.dtype))
    coefficients = spec.coefficients.to(work.dtype) if spec.coefficients.dtype != work.dtype else spec.coefficients
    y = _SpectralActivationProduct.apply(work, coefficients, spec.locations, spec, _gathers(spec, x.device),
                                         _Anchor(x, torch.is_grad_enabled()), out)
    return out if out is not None else y.reshape(*lead, spec.out_features).to(x.dtype)


def delta_weight(spec: Spectrum) -> torch.Tensor:
    """The dense M x N ``dW`` in float32/float64 (dense path and merging)."""
    coefficients = spec.coefficients.to(_compute_dtype(spec.coefficients.dtype))
    s = _ScatterSpectrum.apply(coefficients, spec.locations, spec)
    if spec.transform == "dct":
        dw = idct(idct(s, dim=0), dim=1)
    else:
        dw = torch.fft.ifft2(s).real
    dw = dw * spec.scaling
    if spec.row_order is not None:
        dw = dw.index_select(0, _inverse_order(spec.row_order))
    if spec.col_order is not None:
        dw = dw.index_select(1, _inverse_order(spec.col_order))
    return dw


# --------------------------------------------------------------------------------------------------------------
# Factored path: dW as a product of the coefficients' basis vectors, as thin as their number
#
# dW = P_row^T (T_M^T S T_N) P_col^T is the sum over coefficients of a_i u_i v_i^T, u_i being row r_i of T_M (a
# column of the inverse transform) with its entries put in S2FT's row order, v_i likewise for c_i. With U = [u_i]
# (M x n) and V = [v_i] (N x n), x @ dW^T = ((x @ V) * a) @ U^T: two thin matrix products, LoRA's of rank n, and
# K = dL/dS at a point (r, c) is the sum over tokens of (g @ u_r)(x @ v_c). The DFT's basis vector is a cosine and a
# sine: Re(e^{i alpha} e^{i beta}) = cos cos - sin sin, so it takes two columns per coefficient. On a GPU this is a
# handful of kernels where the dense path runs the 2-D transforms over M x N and keeps dW for backward.


@functools.lru_cache(maxsize=256)
def _basis_tables(size: int, dtype: torch.dtype, device: torch.device):
    """Per length: the positions p in their own order, the DCT's odd multipliers 2p + 1 of them and its scale per
    frequency."""
    positions = torch.arange(size, device=device)
    return positions, 2 * positions + 1, dct_scale(size).to(device=device, dtype=dtype)


def _basis(size: int, frequencies: torch.Tensor, order: Optional[torch.Tensor], transform: str,
           dtype: torch.dtype, conjugate: bool = False) -> torch.Tensor:
    """The basis vectors of ``frequencies`` as columns: (size, k) for the DCT, (size, 2k) cosines then sines for the
    DFT (``conjugate``: the sines negated, the input side's); rows in ``order``'s positions (S2FT)."""
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    positions, odd, scale = _basis_tables(size, angle_dtype, frequencies.device)
    if order is not None:
        positions = _inverse_order(order)
        odd = 2 * positions + 1
    if transform == "dct":
        # the angle pi f (2p + 1) / (2 size), reduced exactly in integers before it becomes a float
        phase = torch.remainder(frequencies[None, :] * odd[:, None], 4 * size).to(angle_dtype)
        return torch.cos(phase.mul_(math.pi / (2 * size))).mul_(scale[frequencies]).to(dtype)
    if conjugate:
        frequencies = (size - frequencies) % size
    angle = torch.remainder(frequencies[None, :] * positions[:, None], size).to(angle_dtype).mul_(2 * math.pi / size)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).to(dtype)


def _out_basis(spec: Spectrum, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _basis(spec.out_features, rows, spec.row_order, spec.transform, dtype)


def _in_basis(spec: Spectrum, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _basis(spec.in_features, cols, spec.col_order, spec.transform, dtype, conjugate=True)


class _Bases:
    """The factored path's basis vectors of a spectrum's cells, output side (M, k) and input side (N, k), kept
    while the cells and orders stand (:func:`_bases`): building them is a dozen small kernels per side, more than
    the thin products themselves cost on a GPU."""

    def __init__(self, spec: Spectrum, dtype: torch.dtype):
        self.out = _out_basis(spec, spec.cells[0], dtype)
        self.inp = _in_basis(spec, spec.cells[1], dtype)


def _bases(spec: Spectrum, dtype: torch.dtype) -> _Bases:
    key = (spec.out_features, spec.in_features, spec.transform, dtype)
    return _per_cells(spec, "bases", key, lambda: _Bases(spec, dtype))


def _column_scale(spec: Spectrum) -> float:
    # ifft2's 1 / (M N) for the DFT (FourierFT's convention); the DCT's basis is orthonormal
    return spec.scaling / (spec.out_features * spec.in_features) if spec.transform == "dft" else spec.scaling


def _basis_dots(left: torch.Tensor, right: torch.Tensor, points: int) -> torch.Tensor:
    """Sum over tokens of ``left * right`` per column, in float32 at least; a DFT point's two columns added."""
    dots = (left.to(_compute_dtype(left.dtype)) * right.to(_compute_dtype(right.dtype))).sum(0)
    return dots if dots.numel() == points else dots[:points] + dots[points:]


class _FactoredProduct(torch.autograd.Function):
    """``x @ dW^T`` for x of shape (T, N) as ``((x @ V) * a) @ U^T``; see the section comment."""

    @staticmethod
    def forward(ctx, x, coefficients, locations, spec: Spectrum):
        bases = _bases(spec, x.dtype)
        weights = coefficients.detach().to(x.dtype) * _column_scale(spec)
        if spec.transform == "dft":
            weights = torch.cat([weights, weights])
        projected = x @ bases.inp
        # the input only for LoCA's location phase (its neighbours' projections): the base layer's own product,
        # whose weight is frozen, does not keep it either
        ctx.save_for_backward(x if spec.locations is not None and spec.train_locations else None, projected)
        ctx.spec, ctx.weights, ctx.bases = spec, weights, bases
        return (projected * weights) @ bases.out.t()

    @staticmethod
    def backward(ctx, grad_y):
        x, projected = ctx.saved_tensors
        spec, bases = ctx.spec, ctx.bases
        grad_y = grad_y.reshape(-1, spec.out_features).to(bases.out.dtype)  # under autocast it may differ
        grad_projected = grad_y @ bases.out
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_projected * ctx.weights) @ bases.inp.t()
        points = _stencil_points(spec)
        spectral_grad = None
        if points is not None:
            count = points[0].numel()
            if count == spec.cells.shape[1]:  # the cells alone: both projections are at hand
                dots = _basis_dots(grad_projected, projected, count)
            else:  # LoCA's location phase: every neighbour's basis vector too
                dots = _basis_dots(grad_y @ _out_basis(spec, points[0], grad_y.dtype),
                                   x @ _in_basis(spec, points[1], x.dtype), count)
            spectral_grad = dots * _column_scale(spec)
        coef_grad, loc_grad = _stencil_gradients(spectral_grad, spec)
        return grad_x, coef_grad, loc_grad, None


def factored_forward(x: torch.Tensor, spec: Spectrum) -> torch.Tensor:
    """``x @ dW^T`` through the coefficients' basis vectors (factored path), in the input's dtype (half-precision
    inputs are multiplied in their own dtype, as LoRA's are)."""
    lead = x.shape[:-1]
    work = x.reshape(-1, spec.in_features)
    if work.dtype not in (torch.float16, torch.bfloat16):
        work = work.to(_compute_dtype(work.dtype))
    y = _FactoredProduct.apply(work, spec.coefficients, spec.locations, spec)
    return y.reshape(*lead, spec.out_features).to(x.dtype)


def _dense_matmuls(training: bool, folded: bool) -> int:
    """The dense path's T x M x N products: forward, input gradient and weight gradient in training, or only the
    layer's own product when dW is folded into the frozen weight (none then in inference)."""
    return (1 if folded else 3) if training else (0 if folded else 1)


def prefers_dense(tokens: int, spec: Spectrum, folded: bool = False) -> bool:
    """On a CPU, whether building dW and multiplying densely beats the transforms on ``tokens`` rows of activations.

    A cost model in nanoseconds, fitted on a 2-core x86 CPU: the activation path costs per token and feature plus
    per token and coefficient; the dense path costs T x M x N matmuls plus the 2-D transforms that build dW (and, in
    training, its spectral gradient). Training takes three matmuls (forward, input gradient, weight gradient), or
    one when dW is ``folded`` into the frozen weight (the layer's own matmuls then carry it); inference one, or none
    folded. Small layers with many tokens go dense (MiniLM's 384 x 384 at 4096 tokens: 19 ms against 23 ms per
    training step unfolded); large layers go through the activations (2048 x 2048 at 1024 tokens: 40 ms against
    320 ms).
    """
    m, n = spec.out_features, spec.in_features
    training = torch.is_grad_enabled()
    matmuls = _dense_matmuls(training, folded)
    passes = 1.0 if training else 0.5  # inference runs the forward half of either path
    activation = passes * (41.0 * tokens * (m + n) + 27.0 * tokens * spec.coefficients.numel())
    dense = 0.031 * matmuls * tokens * m * n + passes * 9.4 * m * n * (math.log2(max(m, 2)) + math.log2(max(n, 2)))
    return dense < activation


def prefers_factored(tokens: int, spec: Spectrum, folded: bool = False) -> bool:
    """On a GPU, whether the factored path's thin products beat the dense path, by a count of multiply-adds.

    The factored path multiplies T x (M + N) by its n columns (2n for the DFT) twice in training, once in
    inference; the dense path T x M x N three times in training (once folded), once in inference (none folded),
    and its 2-D transforms pass over M x N about twenty times in training (ten in inference), each pass worth
    ``_GPU_PASS_MACS`` multiply-adds, and launch their many small kernels at a fixed cost of
    ``_GPU_DENSE_FIXED_MACS`` per direction. Both constants were fitted on an H100 in bf16
    (``benchmarks/path_choice.py``: LoCA and the FourierFT mode, square widths 256 to 4096, n 100 to 10000, 1024
    and 4096 tokens; the faster path at 141 of 144 points over two runs), where such layers are bound by kernel
    launches as much as by arithmetic.
    """
    m, n = spec.out_features, spec.in_features
    training = torch.is_grad_enabled()
    columns = spec.coefficients.numel() * (2 if spec.transform == "dft" else 1)
    matmuls = _dense_matmuls(training, folded)
    directions = 2 if training else 1
    factored = directions * tokens * columns * (m + n)
    dense = matmuls * tokens * m * n + directions * (10 * _GPU_PASS_MACS * m * n + _GPU_DENSE_FIXED_MACS)
    return factored < dense


_GPU_PASS_MACS = 2500.0
_GPU_DENSE_FIXED_MACS = 1e11


def choose_path(tokens: int, spec: Spectrum, device: torch.device = torch.device("cpu"), folded: bool = False) -> str:
    """The cheapest path for ``tokens`` rows: on a CPU the activation or the dense path (:func:`prefers_dense`); on
    a GPU, where the activation path is many small kernels, the factored or the dense path
    (:func:`prefers_factored`)."""
    if device.type == "cpu":
        return "dense" if prefers_dense(tokens, spec, folded) else "activation"
    return "factored" if prefers_factored(tokens, spec, folded) else "dense"


def dense_forward(x: torch.Tensor, spec: Spectrum) -> torch.Tensor:
    """``x @ dW^T`` with dW built densely. dW is cast to a half-precision input's dtype (as stock PEFT does), so
    the activations are never copied to float32; its gradient still reaches the float32 coefficients."""
    dw = delta_weight(spec)
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.linear(x, dw.to(x.dtype))
    return F.linear(x.to(dw.dtype), dw).to(x.dtype)


# the three ways of computing x @ dW^T, by the name a layer's ``spectral_path`` gives them
DELTA_PRODUCTS: dict[str, Callable[[torch.Tensor, Spectrum], torch.Tensor]] = {
    "activation": apply_delta, "dense": dense_forward, "factored": factored_forward,
}


# --------------------------------------------------------------------------------------------------------------
# Locations


def resolve_moves(old_cells: torch.Tensor, proposed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Accept the proposed cells that stay distinct; a move onto any occupied cell is refused.

    ``old_cells`` (2, n) long are distinct; ``proposed`` (2, n) long are inside the matrix. A moving coefficient may
    not enter a cell that any coefficient held before the move (even one that is leaving it), and among movers
    aiming at the same free cell the lowest index wins. So every refused coefficient can stay where it was and the
    result is always distinct. Deterministic, so every rank of a distributed run makes the same choice.
    """
    width = shape[1]
    old_flat = old_cells[0] * width + old_cells[1]
    new_flat = proposed[0] * width + proposed[1]
    moving = new_flat != old_flat
    accept = moving & ~torch.isin(new_flat, old_flat)
    candidates = torch.nonzero(accept).squeeze(1)
    if candidates.numel() > 1:
        # stable sort by target cell keeps index order within a target: the first of each run wins
        order = torch.sort(new_flat[candidates], stable=True).indices
        sorted_targets = new_flat[candidates][order]
        first = torch.ones_like(sorted_targets, dtype=torch.bool)
        first[1:] = sorted_targets[1:] != sorted_targets[:-1]
        accept[candidates[order[~first]]] = False
    return torch.where(accept, proposed, old_cells)


def random_cells(shape: tuple[int, int], n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` distinct cells drawn uniformly from an M x N matrix, as (2, n) long."""
    m, n_cols = shape
    flat = torch.randperm(m * n_cols, generator=generator)[:n]
    return torch.stack([flat // n_cols, flat % n_cols])


def check_cells(cells: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    """Raise if ``cells`` (2, n) are not integral, inside ``shape`` or distinct."""
    if cells.dim() != 2 or cells.shape[0] != 2:
        raise ValueError(f"{what}: locations must have shape (2, n), got {tuple(cells.shape)}")
    if cells.is_floating_point():
        if not torch.isfinite(cells).all():
            raise ValueError(f"{what}: locations contain NaN or Inf")
        cells = cells.round()
    m, n = shape
    rows, cols = cells[0], cells[1]
    if rows.numel() and (rows.min() < 0 or rows.max() > m - 1 or cols.min() < 0 or cols.max() > n - 1):
        raise ValueError(
            f"{what}: locations fall outside the {m} x {n} matrix "
            f"(rows {int(rows.min())}..{int(rows.max())}, columns {int(cols.min())}..{int(cols.max())})"
        )
    flat = rows.long() * n + cols.long()
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError(f"{what}: {flat.numel() - torch.unique(flat).numel()} locations share a cell with another")


def check_permutation(order: torch.Tensor, size: int, what: str) -> None:
    """Raise unless ``order`` is a permutation of ``range(size)``."""
    if order.dim() != 1 or order.numel() != size:
        raise ValueError(f"{what}: expected a permutation of {size} indices, got shape {tuple(order.shape)}")
    if order.is_floating_point() or order.is_complex():
        raise ValueError(f"{what}: expected integer indices, got {order.dtype}")
    seen = torch.zeros(size, dtype=torch.bool, device=order.device)
    if order.numel() and (order.min() < 0 or order.max() >= size):
        raise ValueError(f"{what}: indices outside 0..{size - 1}")
    seen[order.long()] = True
    if not seen.all():
        raise ValueError(f"{what}: not a permutation ({int((~seen).sum())} indices missing, some repeated)")
