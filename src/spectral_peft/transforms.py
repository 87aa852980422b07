"""Orthonormal DCT-II and its inverse along one axis, in O(N log N) through ``torch.fft``.

``dct(x)`` equals ``scipy.fft.dct(x, type=2, norm="ortho")`` and ``idct`` is its inverse (the orthonormal
DCT-III). Both are orthogonal maps, so the gradient of one is the other: the autograd functions below use that
instead of differentiating through the FFT. Half-precision inputs are computed in float32 and returned in their
own dtype (CPU FFTs do not take fp16/bf16, and cuFFT only for powers of two).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

__all__ = ["dct", "idct"]

# the dtypes the transforms compute in; others (half precision) are computed in float32
COMPUTE_DTYPES = (torch.float32, torch.float64)


def dct_scale(n: int) -> torch.Tensor:
    """The orthonormal DCT-II's scale of each output index (float64)."""
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return scale


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``order``: ``x[order][inverse_order(order)]`` is ``x``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def makhoul_order(n: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Makhoul's order of n samples, whose real FFT gives the DCT-II: the even samples, then the odd ones reversed."""
    return torch.cat([torch.arange(0, n, 2, device=device), torch.arange(1, n, 2, device=device).flip(0)])


class _Tables(NamedTuple):
    order: torch.Tensor  # Makhoul's order: x[order] is the rfft's input
    restore: torch.Tensor  # its inverse
    twiddle: torch.Tensor  # exp(-i pi k / 2n) for the rfft's n // 2 + 1 bins
    out_index: torch.Tensor  # the real or imaginary part of a bin that each DCT output reads
    out_weight: torch.Tensor  # with its scale and sign
    in_index: torch.Tensor  # the input that each real and imaginary part of the inverse's bins reads
    in_weight: torch.Tensor  # with its weight (zero for the imaginary part of bin 0)


@functools.lru_cache(maxsize=64)
def _tables(n: int, dtype: torch.dtype, device: torch.device) -> _Tables:
    """Cached per length: the transforms as index and weight tables, so that each is a handful of whole-tensor
    operations."""
    order = makhoul_order(n)
    restore = inverse_order(order)
    bins = n // 2 + 1
    k = torch.arange(bins, dtype=torch.float64)
    twiddle = torch.exp(-1j * math.pi * k / (2 * n))
    scale = dct_scale(n)
    # DCT output k: Re(W_k V_k) for k <= n/2, -Im(W_j V_j) with j = n - k above
    out = torch.arange(n)
    upper = out > n // 2
    out_index = torch.where(upper, 2 * (n - out) + 1, 2 * out)
    out_weight = torch.where(upper, -scale, scale)
    # inverse: bin k is (c_k - i c_{n-k}) with c = x / scale and c_n = 0
    mirror = (n - torch.arange(bins)) % n
    in_index = torch.stack([torch.arange(bins), mirror], dim=-1).reshape(-1)
    in_weight = torch.stack([1 / scale[:bins], -1 / scale[mirror]], dim=-1)
    in_weight[0, 1] = 0.0
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return _Tables(order.to(device), restore.to(device), twiddle.to(device=device, dtype=complex_dtype),
                   out_index.to(device), out_weight.to(device=device, dtype=dtype), in_index.to(device),
                   in_weight.reshape(-1).to(device=device, dtype=dtype))


def _dct_last(x: torch.Tensor) -> torch.Tensor:
    # Makhoul with a real FFT: C_k = Re(W_k V_k) for the rfft's bins k <= n/2, and C_{n-k} = -Im(W_k V_k) above.
    n = x.shape[-1]
    tables = _tables(n, x.dtype, x.device)
    # in place where a tensor is the operation's own: a fresh one is faulted in page by page, at a cost like the FFT's
    t = torch.fft.rfft(x.index_select(-1, tables.order), dim=-1).mul_(tables.twiddle)
    return torch.view_as_real(t).flatten(-2).index_select(-1, tables.out_index).mul_(tables.out_weight)


def _idct_last(x: torch.Tensor) -> torch.Tensor:
    # The inverse: the rfft bins V_k = conj(W_k) (c_k - i c_{n-k}) (c = x / scale, c_n = 0), one inverse real FFT,
    # then the samples back from Makhoul's order.
    n = x.shape[-1]
    tables = _tables(n, x.dtype, x.device)
    bins = x.index_select(-1, tables.in_index).mul_(tables.in_weight).view(*x.shape[:-1], n // 2 + 1, 2)
    v = torch.fft.irfft(torch.view_as_complex(bins).mul_(tables.twiddle.conj()), n=n, dim=-1)
    return v.index_select(-1, tables.restore)


def _along(fn, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Apply a last-axis transform along ``dim``, computing half precision in float32."""
    in_dtype = x.dtype
    if not in_dtype.is_floating_point:
        raise TypeError(f"DCT needs a floating-point tensor, got {in_dtype}")
    if x.numel() == 0:  # nothing to transform (the FFT refuses empty input)
        return x.clone()
    work = x if in_dtype in COMPUTE_DTYPES else x.float()
    # the transform's passes run along contiguous rows: strided ones (a transform along dim 0) cost several
    # times the one copy that lines the data up
    moved = work.movedim(dim, -1).contiguous()
    out = fn(moved).movedim(-1, dim)
    return out.to(in_dtype)


class _Orthogonal(torch.autograd.Function):
    """An orthogonal transform along ``dim``: the gradient is its inverse applied to the output's gradient."""

    @staticmethod
    def forward(ctx, x, dim, transform, inverse):
        ctx.dim, ctx.inverse = dim, inverse
        return _along(transform, x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _along(ctx.inverse, grad, ctx.dim), None, None, None


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (``scipy.fft.dct(x, norm="ortho")``)."""
    return _Orthogonal.apply(x, dim, _dct_last, _idct_last)


def idct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`dct` (orthonormal DCT-III) along ``dim``."""
    return _Orthogonal.apply(x, dim, _idct_last, _dct_last)
