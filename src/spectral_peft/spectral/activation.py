"""The activation path: ``x @ dW^T`` through real FFTs of the activations and one sparse product between their half
spectra (:mod:`.half_spectrum`). No M x N tensor is formed; the cost per token is O(N log N + M log M + n).

Activations stay (tokens, features) row-major throughout and are processed a block of rows at a time on a CPU, so a
step's temporaries (a few block x features tensors) stay in cache between the reorder, FFT, sparse product, inverse
FFT and sum; whole-batch temporaries would make every one of those passes go to memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..transforms import makhoul_reorder
from .cache import Scratch, placement_of, workspace_of
from .half_spectrum import Structure
from .spectrum import Spectrum, compute_dtype, inverse_order, stencil_gradients

# A block holds about _BLOCK_ELEMENTS values, and at least _BLOCK_MIN_ROWS rows: each operation has a fixed cost per
# call (torch's MKL backend plans every FFT anew), which many thin blocks of a very wide layer would pay many times.
_BLOCK_ELEMENTS = 1 << 18
_BLOCK_MIN_ROWS = 128


def row_blocks(tokens: int, width: int, device: torch.device) -> list[slice]:
    if device.type != "cpu":  # one launch per operation beats many small ones on an accelerator
        return [slice(0, tokens)]
    rows = max(_BLOCK_MIN_ROWS, _BLOCK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + rows, tokens)) for start in range(0, tokens, rows)]


def _times_transposed(q: torch.Tensor, dense: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``dense @ q^T`` for a (T, K) row-major ``dense`` and a (J, K) CSR ``q``: a (T, J) row-major result.

    Computed as ``q @ dense^T`` into the transposed view of the result, so the sparse kernel reads and writes the
    activations in their own layout; ``dense @ csr`` would transpose both operands and copy the result back.
    """
    out = scratch("product", dense.shape[0], q.shape[0], dense.dtype)
    torch.addmm(out.t(), q, dense.t(), beta=0.0, out=out.t())
    return out


# --------------------------------------------------------------------------------------------------------------
# feature reorders around the FFTs

Reorder = Callable[..., torch.Tensor]  # (x, out=None) -> x reordered along its last axis (into out if given)


def _identity(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    return x if out is None else out.copy_(x)


def _gather(order: torch.Tensor) -> Reorder:
    # torch.gather with the order broadcast over the rows: one pass, faster than index_select along the last axis
    return lambda x, out=None: torch.gather(x, -1, order.expand(x.shape), out=out)


Adder = Callable[[torch.Tensor, torch.Tensor, Scratch], None]  # (target, t, scratch): target += t reordered


def _add(target: torch.Tensor, t: torch.Tensor, scratch: Scratch) -> None:
    target.add_(t)


def _scatter_add(order: torch.Tensor) -> Adder:
    """``target[..., order[j]] += t[..., j]`` in place."""
    return lambda target, t, scratch: target.scatter_add_(-1, order.expand(t.shape), t)


# An arbitrary order (S2FT's) read from a tensor in memory defeats the hardware's prefetching, which Makhoul's two
# strided streams do not: so with S2FT's orders a layer's input and output gradient are read in sequence and
# scattered into a block in cache, and the output is added to in sequence from a gather of the block.


def _scatter(inverse: torch.Tensor) -> Reorder:
    """``out[..., inverse[i]] = x[..., i]``: the reorder ``_gather(order)`` with x read in sequence."""
    return lambda x, out=None: (torch.empty_like(x) if out is None else out).scatter_(-1, inverse.expand(x.shape), x)


def _gather_add(inverse: torch.Tensor) -> Adder:
    """``target[..., i] += t[..., inverse[i]]`` in place: ``_scatter_add(order)`` with target written in sequence."""
    def add(target: torch.Tensor, t: torch.Tensor, scratch: Scratch) -> None:
        reordered = scratch("reordered back", t.shape[0], t.shape[1], t.dtype)
        target.add_(torch.gather(t, -1, inverse.expand(t.shape), out=reordered))
    return add


def _makhoul_orders(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Makhoul's reorder as indices, and its inverse."""
    order = makhoul_reorder(torch.arange(size, device=device))
    return order, inverse_order(order)


@dataclass
class Gathers:
    """Feature reorders around the FFTs, along the last axis: each composes a method's ordering (S2FT) with the
    transform's own (Makhoul's for the DCT, none for the DFT). Kept with the :class:`~.cache.Placement`."""

    col_gather: Reorder  # x -> the rfft's input
    col_scatter: Reorder  # its inverse
    row_gather: Reorder  # the irfft's output -> y
    row_scatter: Reorder  # its inverse
    row_add: Adder  # (target, irfft's output, scratch): target += row_gather(output)


def _build_gathers(spec: Spectrum, device: torch.device) -> Gathers:
    def reorders(order: Optional[torch.Tensor], size: int) -> tuple[Reorder, Reorder, Adder]:
        """(before the rfft, its inverse, adding the inverse into a target) for a method's ``order``."""
        if order is None and spec.transform == "dft":
            return _identity, _identity, _add
        if order is None:
            order, inverse = _makhoul_orders(size, device)
            return _gather(order), _gather(inverse), _scatter_add(order)
        order = order.to(device)
        if spec.transform == "dct":  # the ordering first, then Makhoul's
            order = order[_makhoul_orders(size, device)[0]]
        inverse = inverse_order(order)
        return _scatter(inverse), _gather(inverse), _gather_add(inverse)

    col_gather, col_scatter, _ = reorders(spec.col_order, spec.in_features)
    # rows run the other way: the irfft's output goes back through the inverse (the output gradient forwards)
    row_scatter, row_gather, row_add = reorders(spec.row_order, spec.out_features)
    return Gathers(col_gather, col_scatter, row_gather, row_scatter, row_add)


# --------------------------------------------------------------------------------------------------------------
# half spectra of activations


def half_spectrum(x: torch.Tensor, reorder: Reorder, scratch: Scratch, keep: bool = False) -> torch.Tensor:
    """(T, N) features -> (T, 2 Nh) real and imaginary parts of the rfft of the reordered features (by blocks of
    rows, so the reordered copy never leaves the cache). The result is a scratch buffer, valid until that buffer's
    next use, or with ``keep`` a tensor of its own (a whole batch kept for backward)."""
    shape, dtype = (x.shape[0], x.shape[1] // 2 + 1), x.dtype.to_complex()
    spectrum = torch.empty(shape, dtype=dtype, device=x.device) if keep else scratch("spectrum", *shape, dtype)
    for rows in row_blocks(x.shape[0], x.shape[1], x.device):
        reordered = x[rows] if reorder is _identity else reorder(
            x[rows], out=scratch("reordered", rows.stop - rows.start, x.shape[1], x.dtype))
        torch.fft.rfft(reordered, dim=-1, out=spectrum[rows])
    return torch.view_as_real(spectrum).reshape(x.shape[0], -1)


def _irfft_half(half: torch.Tensor, size: int, scratch: Scratch) -> torch.Tensor:
    """(T, 2 Mh) real and imaginary parts of a half spectrum -> (T, M) by the inverse real FFT, into scratch."""
    out = scratch("features", half.shape[0], size, half.dtype)
    return torch.fft.irfft(torch.view_as_complex(half.reshape(half.shape[0], -1, 2)), n=size, dim=-1, out=out)


@dataclass
class _Call:
    """What a layer call passes its product besides tensors: the tensor the layer was called with (hidden from
    autograd: the shared input spectrum lives while it does), whether gradients are on (autograd runs a Function's
    forward without them, and without saying so), and the reorders."""

    anchor: torch.Tensor
    grad_enabled: bool
    gathers: Gathers


class _SpectralActivationProduct(torch.autograd.Function):
    """``x @ dW^T`` for x of shape (T, N), in the compute dtype; see the module docstring."""

    @staticmethod
    def forward(ctx, x, coefficients, locations, spec: Spectrum, call: _Call, out):
        m, n = spec.out_features, spec.in_features
        structure = placement_of(spec).get(("structure", x.dtype), lambda: Structure(spec, x.dtype))
        gathers, workspace = call.gathers, workspace_of(spec)
        _, factor, pair = structure.entries
        values = factor * coefficients.detach().to(x.dtype)[pair] * spec.scaling
        q = structure.pattern.matrix(values)  # half_out = half_in @ Q^T
        scratch = workspace.scratch(x.device)
        # Backward needs the input only through its half spectrum, at the columns its gradient points touch. Where
        # other layers share that spectrum it is kept whole (one input-sized tensor for them all); S2FT's per-layer
        # column orders make it the layer's own, so only those columns are kept (its cells crowd low frequencies).
        # In inference nothing is kept and each block transforms its own rows.
        shared = call.grad_enabled and spec.col_order is None
        half_in = kept = columns = None
        if shared:
            half_in = workspace.shared_spectrum(call.anchor, (spec.transform, n, x.dtype),
                                                lambda: half_spectrum(x, gathers.col_gather, scratch, keep=True))
        elif call.grad_enabled:
            stencil = structure.stencil(spec)  # the cells' own (S2FT has no locations): kept with the structure
            columns = stencil.columns if stencil is not None else structure.entries[0][:0]
            kept = x.new_empty(x.shape[0], columns.numel())
        result = x.new_empty(x.shape[0], m) if out is None else out
        for rows in row_blocks(x.shape[0], max(m, n), x.device):
            block = half_in[rows] if shared else half_spectrum(x[rows], gathers.col_gather, scratch)
            if kept is not None:
                torch.index_select(block, 1, columns, out=kept[rows])
            features = _irfft_half(_times_transposed(q, block, scratch), m, scratch)
            if out is None:
                gathers.row_gather(features, out=result[rows])
            else:  # added into the base layer's output where it lies: no (T, M) copy for the reorder nor the sum
                gathers.row_add(result[rows], features.to(out.dtype), scratch)
        if call.grad_enabled:
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
        dots, scratch = None, workspace_of(spec).scratch(half_in.device)
        for rows in row_blocks(grad_y.shape[0], max(m, n), half_in.device):
            # (rows, 2 Mh)
            raw_grad_half_out = half_spectrum(grad_y[rows].to(half_in.dtype), gathers.row_scatter, scratch)
            if grad_x is not None:
                features = _irfft_half(_times_transposed(adjoint, raw_grad_half_out, scratch), n, scratch)
                gathers.col_scatter(features, out=grad_x[rows])
            if stencil is not None:  # K = dL/dS at the stencil points, summed over the blocks
                block = stencil.sampled_dots(raw_grad_half_out, half_in[rows], ctx.kept_columns)
                dots = block if dots is None else dots.add_(block)
        spectral_grad = stencil.spectral_grad(dots, spec.scaling) if stencil is not None else None
        coef_grad, loc_grad = stencil_gradients(spectral_grad, spec)
        # the base output it was added into passes its gradient through
        return grad_x, coef_grad, loc_grad, None, None, grad_y if ctx.needs_input_grad[5] else None


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
    work = x.reshape(-1, spec.in_features).to(compute_dtype(x.dtype))
    coefficients = spec.coefficients.to(work.dtype) if spec.coefficients.dtype != work.dtype else spec.coefficients
    gathers = placement_of(spec).get(("gathers", x.device), lambda: _build_gathers(spec, x.device))
    y = _SpectralActivationProduct.apply(work, coefficients, spec.locations, spec,
                                         _Call(x, torch.is_grad_enabled(), gathers), out)
    return out if out is not None else y.reshape(*lead, spec.out_features).to(x.dtype)
