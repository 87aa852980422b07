"""The activation path: ``x @ dW^T`` through real FFTs of the activations and one sparse product between their half
spectra (:mod:`.half_spectrum`). No M x N tensor is formed; the cost per token is O(N log N + M log M + n).

Activations are processed a block of rows at a time on a CPU, so a step's temporaries (a few block x features
tensors) stay in cache between the reorder, FFT, sparse product, inverse FFT and sum; whole-batch temporaries would
make every one of those passes go to memory. The FFTs run along the rows of (tokens, features) blocks, the sparse
products and the sampled dots on (features, tokens) ones: a half spectrum is transposed once after its FFT, a
product's result once before its inverse FFT.

A frozen float32/64 layer's own product is computed in the same autograd Function (:func:`linear_with_delta`), so
the update is added into the layer's output in place and, in backward, the update's input gradient into the frozen
product's: one (tokens, N) gradient per layer call. :func:`folded_linear` is the dense path's counterpart: dW folded
into the frozen product, the gradients read off the activations' half spectra as here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..transforms import inverse_order, makhoul_order
from .cache import Scratch, placement_of, workspace_of
from .half_spectrum import Structure
from .spectrum import Spectrum, compute_dtype, delta_weight, stencil_gradients

# A block holds about _BLOCK_ELEMENTS values, and at least _BLOCK_MIN_ROWS rows: each operation has a fixed cost per
# call (torch's MKL backend plans every FFT anew), which many thin blocks of a very wide layer would pay many times.
_BLOCK_ELEMENTS = 1 << 18
_BLOCK_MIN_ROWS = 128


def row_blocks(tokens: int, width: int, device: torch.device) -> list[slice]:
    if device.type != "cpu":  # one launch per operation beats many small ones on an accelerator
        return [slice(0, tokens)]
    rows = max(_BLOCK_MIN_ROWS, _BLOCK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + rows, tokens)) for start in range(0, tokens, rows)]


def _product_rows(q: torch.Tensor, spectrum: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``(q @ spectrum)^T`` for a (J, K) CSR ``q`` and a (K, T) feature-major ``spectrum``: a (T, J) row-major result
    for the inverse FFT along its rows.

    The sparse kernel (MKL's, zero-based indices) takes its dense operand and result row-major only: given the
    activations' own (T, K) layout it copies them transposed on every call and is then 6x slower than on (K, T) rows,
    where each entry of ``q`` adds one contiguous row of tokens.
    """
    product = scratch("product", q.shape[0], spectrum.shape[1], spectrum.dtype)
    torch.addmm(product, q, spectrum, beta=0.0, out=product)
    return scratch("product rows", spectrum.shape[1], q.shape[0], spectrum.dtype).copy_(product.t())


# --------------------------------------------------------------------------------------------------------------
# feature reorders around the FFTs


def select_features(x: torch.Tensor, index: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[:, index]`` (x itself for no index), into ``out`` if given. ``index_select`` along the features reads x
    row by row and is about twice as fast as ``gather`` or ``scatter_`` with a broadcast index."""
    if index is None:
        return x if out is None else out.copy_(x)
    return torch.index_select(x, 1, index, out=out) if out is not None else x.index_select(1, index)


@dataclass
class Reorders:
    """Feature orders around the FFTs, as indices into the last axis (None: none): each composes a method's
    ordering (S2FT) with the transform's own (Makhoul's for the DCT, none for the DFT). Kept with the
    :class:`~.cache.Placement`."""

    col: Optional[torch.Tensor]  # x[:, col] is the rfft's input
    col_inverse: Optional[torch.Tensor]  # the input gradient from the irfft's output
    row: Optional[torch.Tensor]  # grad_y[:, row] is the rfft's input in backward
    row_inverse: Optional[torch.Tensor]  # y from the irfft's output


def _build_reorders(spec: Spectrum, device: torch.device) -> Reorders:
    def order_and_inverse(order: Optional[torch.Tensor], size: int):
        if order is None and spec.transform == "dft":
            return None, None
        if order is None:
            order = makhoul_order(size, device)
        else:
            order = order.to(device)
            if spec.transform == "dct":  # the ordering first, then Makhoul's
                order = order[makhoul_order(size, device)]
        return order, inverse_order(order)

    return Reorders(*order_and_inverse(spec.col_order, spec.in_features),
                    *order_and_inverse(spec.row_order, spec.out_features))


# --------------------------------------------------------------------------------------------------------------
# half spectra of activations


def _reordered(x: torch.Tensor, index: Optional[torch.Tensor], scratch: Scratch) -> torch.Tensor:
    """``x[:, index]`` for one block of rows, into a scratch buffer that stays in cache (x itself for no index)."""
    return x if index is None else select_features(x, index, out=scratch("reordered", x.shape[0], x.shape[1], x.dtype))


def _rfft_rows(x: torch.Tensor, index: Optional[torch.Tensor], scratch: Scratch) -> torch.Tensor:
    """(T, N) features of one block of rows -> (T, 2 Nh) real and imaginary parts of the rfft of ``x[:, index]``.
    The rfft writes a tensor of its own (an ``out=`` FFT computes into a temporary and copies it)."""
    return torch.view_as_real(torch.fft.rfft(_reordered(x, index, scratch), dim=-1)).reshape(x.shape[0], -1)


def half_spectrum(x: torch.Tensor, index: Optional[torch.Tensor], scratch: Scratch, name: str) -> torch.Tensor:
    """:func:`_rfft_rows` of one block of rows, feature-major: (2 Nh, T) in the scratch buffer ``name``, the layout
    the sparse products and the sampled dots read."""
    spectrum = _rfft_rows(x, index, scratch)
    out = scratch(name, spectrum.shape[1], spectrum.shape[0], spectrum.dtype)
    # copied as a batch of one: torch's 2-D transposing copy goes through 60 x 60 tiles, and its general strided loop
    # is 25-40% faster where, as here, the destination's rows are a block's few hundred tokens (the opposite way,
    # _product_rows', the tiles win)
    out.unsqueeze(0).copy_(spectrum.t().unsqueeze(0))
    return out


def kept_half_spectrum(x: torch.Tensor, index: Optional[torch.Tensor], scratch: Scratch) -> torch.Tensor:
    """:func:`half_spectrum` of a whole batch, (2 Nh, T), a block of rows at a time (so the reordered copy never
    leaves the cache), into one tensor kept for backward."""
    spectrum = x.new_empty(2 * (x.shape[1] // 2 + 1), x.shape[0])
    for rows in row_blocks(x.shape[0], x.shape[1], x.device):
        spectrum[:, rows].copy_(_rfft_rows(x[rows], index, scratch).t())
    return spectrum


def _irfft_half(half: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 2 Mh) real and imaginary parts of a half spectrum -> (T, M) by the inverse real FFT."""
    return torch.fft.irfft(torch.view_as_complex(half.reshape(half.shape[0], -1, 2)), n=size, dim=-1)


def _add_selected(target: torch.Tensor, t: torch.Tensor, index: Optional[torch.Tensor], scratch: Scratch) -> None:
    """``target += t[:, index]`` in place, through a reordered copy in cache."""
    target.add_(t if index is None else select_features(
        t, index, out=scratch("reordered back", t.shape[0], t.shape[1], t.dtype)))


def _autocast_off(backward):
    """A Function's backward with autocast off on its gradient's device: a backward run inside an autocast region
    would cast some operands of its sparse products to half precision and not others."""
    @functools.wraps(backward)
    def run(ctx, grad_y):
        with torch.autocast(grad_y.device.type, enabled=False):
            return backward(ctx, grad_y)
    return run


@dataclass
class _Call:
    """What a layer call passes its product besides tensors: the tensor the layer was called with (hidden from
    autograd: the shared input spectrum lives while it does), whether gradients are on (autograd runs a Function's
    forward without them, and without saying so), the reorders, and the frozen (weight, bias) whose product the
    update is added into, if the Function computes that product too."""

    anchor: torch.Tensor
    grad_enabled: bool
    reorders: Reorders
    frozen: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None


class _SpectralActivationProduct(torch.autograd.Function):
    """``x @ dW^T`` for x of shape (T, N), in the compute dtype; see the module docstring."""

    @staticmethod
    def forward(ctx, x, coefficients, locations, spec: Spectrum, call: _Call, out):
        # the frozen product as the base layer computes it (in half precision under autocast); the update in the
        # compute dtype, autocast off (it would cast some operands of the sparse products and not others)
        into = out if out is not None or call.frozen is None else F.linear(x, *call.frozen)
        with torch.autocast(x.device.type, enabled=False):
            result = _SpectralActivationProduct._add_update(ctx, x, coefficients, spec, call, into)
        if out is not None:
            ctx.mark_dirty(out)
        return result

    @staticmethod
    def _add_update(ctx, x, coefficients, spec: Spectrum, call: _Call, into: Optional[torch.Tensor]):
        """The update, added into ``into`` if given, else a new tensor; what backward needs goes on ``ctx``."""
        m, n = spec.out_features, spec.in_features
        structure = placement_of(spec).get(("structure", x.dtype), lambda: Structure(spec, x.dtype))
        reorders, workspace = call.reorders, workspace_of(spec)
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
                                                lambda: kept_half_spectrum(x, reorders.col, scratch))
        elif call.grad_enabled:
            stencil = structure.stencil(spec)  # S2FT has no locations: the cells alone
            columns = stencil.columns if stencil is not None else structure.entries[0][:0]
            kept = x.new_empty(columns.numel(), x.shape[0])
        result = x.new_empty(x.shape[0], m) if into is None else into
        for rows in row_blocks(x.shape[0], max(m, n), x.device):
            block = half_in[:, rows] if shared else half_spectrum(x[rows], reorders.col, scratch, "input spectrum")
            if kept is not None:
                kept[:, rows] = torch.index_select(block, 0, columns)
            features = _irfft_half(_product_rows(q, block, scratch), m)
            if into is None:
                select_features(features, reorders.row_inverse, out=result[rows])
            else:  # added into the base layer's output where it lies: no (T, M) copy for the reorder nor the sum
                _add_selected(result[rows], features.to(into.dtype), reorders.row_inverse, scratch)
        if call.grad_enabled:
            ctx.save_for_backward(half_in if shared else kept)
        ctx.spec, ctx.reorders, ctx.structure, ctx.values = spec, reorders, structure, values
        ctx.kept_columns, ctx.frozen_weight = not shared, None if call.frozen is None else call.frozen[0]
        return result

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_y):
        (half_in,) = ctx.saved_tensors
        spec, reorders, structure = ctx.spec, ctx.reorders, ctx.structure
        stencil = structure.stencil(spec)
        m, n = spec.out_features, spec.in_features
        grad_y = grad_y.reshape(-1, m)
        grad_x = adjoint = None
        if ctx.needs_input_grad[0]:
            pattern, weight = structure.adjoint(spec)
            adjoint = pattern.matrix(ctx.values * weight)
            # with the frozen product, its input gradient is the tensor the update's is added into
            frozen = ctx.frozen_weight
            grad_x = half_in.new_empty(grad_y.shape[0], n) if frozen is None else grad_y.to(frozen.dtype).mm(frozen)
        dots, scratch = None, workspace_of(spec).scratch(half_in.device)
        for rows in row_blocks(grad_y.shape[0], max(m, n), half_in.device):
            # (2 Mh, rows)
            raw_grad_half_out = half_spectrum(grad_y[rows].to(half_in.dtype), reorders.row, scratch, "grad spectrum")
            if grad_x is not None:
                features = _irfft_half(_product_rows(adjoint, raw_grad_half_out, scratch), n)
                if ctx.frozen_weight is None:
                    select_features(features, reorders.col_inverse, out=grad_x[rows])
                else:
                    _add_selected(grad_x[rows], features, reorders.col_inverse, scratch)
            if stencil is not None:  # K = dL/dS at the stencil points, summed over the blocks
                block = stencil.sampled_dots(raw_grad_half_out, half_in[:, rows], ctx.kept_columns)
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
    y = _apply(x, spec, out, None)
    return out if out is not None else y.reshape(*lead, spec.out_features).to(x.dtype)


def linear_with_delta(x: torch.Tensor, spec: Spectrum, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``F.linear(x, weight, bias) + x @ dW^T`` as a (tokens, M) tensor, with the update added into the frozen
    product in place and, in backward, the update's input gradient added into the frozen product's: one (tokens, N)
    gradient and no sum of two. ``weight`` and ``bias`` must be frozen, and x of their float32/64 dtype."""
    _check_owns("linear_with_delta", x, weight, bias)
    if x.numel() == 0:
        return F.linear(x.reshape(-1, spec.in_features), weight, bias)
    return _apply(x, spec, None, (weight, bias))


class _FoldedProduct(torch.autograd.Function):
    """``F.linear(x, weight + dW, bias)`` for a frozen weight and x of shape (T, N): the dense update carried by the
    frozen product, with the gradients read off the activations' half spectra at the stencil points, as the activation
    path reads them, instead of off a dense weight gradient (a T x M x N product and a 2-D transform of it)."""

    @staticmethod
    def forward(ctx, x, coefficients, locations, spec: Spectrum, weight, bias, reorders: Reorders):
        with torch.autocast(x.device.type, enabled=False):  # the product alone follows autocast, as the base layer's
            folded = weight + delta_weight(spec).to(weight.dtype)
        ctx.save_for_backward(x, folded)
        ctx.spec, ctx.reorders = spec, reorders
        return F.linear(x, folded, bias)

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_y):
        x, folded = ctx.saved_tensors
        spec, reorders = ctx.spec, ctx.reorders
        grad_y = grad_y.to(x.dtype)  # under autocast the product, and so its gradient, may be in half precision
        structure = placement_of(spec).get(("structure", x.dtype), lambda: Structure(spec, x.dtype))
        stencil = structure.stencil(spec)
        dots, scratch = None, workspace_of(spec).scratch(x.device)
        width = max(spec.out_features, spec.in_features)
        for rows in row_blocks(x.shape[0], width, x.device) if stencil is not None else []:
            block = stencil.sampled_dots(half_spectrum(grad_y[rows], reorders.row, scratch, "grad spectrum"),
                                         half_spectrum(x[rows], reorders.col, scratch, "input spectrum"), False)
            dots = block if dots is None else dots.add_(block)
        spectral_grad = stencil.spectral_grad(dots, spec.scaling) if dots is not None else None
        coef_grad, loc_grad = stencil_gradients(spectral_grad, spec)
        grad_x = grad_y.mm(folded) if ctx.needs_input_grad[0] else None
        return grad_x, coef_grad, loc_grad, None, None, None, None


def folded_linear(x: torch.Tensor, spec: Spectrum, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``F.linear(x, weight + dW, bias)`` as a (tokens, M) tensor, dW built densely (the dense path folded into a
    frozen layer's product); backward reads the coefficient gradients off the half spectra of the activations, with no
    weight gradient. ``weight`` and ``bias`` must be frozen, and x of their float32/64 dtype."""
    _check_owns("folded_linear", x, weight, bias)
    work = x.reshape(-1, spec.in_features)
    if x.numel() == 0:
        return F.linear(work, weight + delta_weight(spec).to(weight.dtype), bias)
    return _FoldedProduct.apply(work, *_inputs(spec, work), weight, bias, _reorders_of(spec, x.device))


def can_own_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`linear_with_delta` and :func:`folded_linear` may compute ``F.linear(x, weight, bias)``: their
    backward gives no gradient to a weight or bias, and computes in x's dtype, which must be float32/64 and weight's."""
    return (not weight.requires_grad and not (bias is not None and bias.requires_grad) and x.dtype == weight.dtype
            and x.dtype == compute_dtype(x.dtype))


def _check_owns(name: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if not can_own_product(x, weight, bias):
        raise ValueError(f"{name}: weight and bias must be frozen and x float32/64 of weight's dtype")


def _apply(x: torch.Tensor, spec: Spectrum, out: Optional[torch.Tensor], frozen) -> torch.Tensor:
    work = x.reshape(-1, spec.in_features).to(compute_dtype(x.dtype))
    call = _Call(x, torch.is_grad_enabled(), _reorders_of(spec, x.device), frozen)
    return _SpectralActivationProduct.apply(work, *_inputs(spec, work), call, out)


def _inputs(spec: Spectrum, work: torch.Tensor) -> tuple:
    """(coefficients in the activations' dtype, locations, spec): what our Functions take after the activations."""
    coefficients = spec.coefficients.to(work.dtype) if spec.coefficients.dtype != work.dtype else spec.coefficients
    return coefficients, spec.locations, spec


def _reorders_of(spec: Spectrum, device: torch.device) -> Reorders:
    return placement_of(spec).get(("reorders", device), lambda: _build_reorders(spec, device))
