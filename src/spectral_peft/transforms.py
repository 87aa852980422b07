"""Orthonormal DCT-II and its inverse along one axis, in O(N log N) through ``torch.fft``.

``dct(x)`` equals ``scipy.fft.dct(x, type=2, norm="ortho")`` and ``idct`` is its inverse (the orthonormal
DCT-III). Both are orthogonal maps, so the gradient of one is the other: the autograd functions below use that
instead of differentiating through the FFT. Half-precision inputs are computed in float32 and returned in their
own dtype (CPU FFTs do not take fp16/bf16, and cuFFT only for powers of two).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

__all__ = ["dct", "idct"]

# the dtypes the transforms compute in; others (half precision) are computed in float32
COMPUTE_DTYPES = (torch.float32, torch.float64)


def dct_scale(n: int) -> torch.Tensor:
    """The orthonormal DCT-II's scale of each output index (float64)."""
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return scale


def makhoul_reorder(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Makhoul's reorder of the last axis, whose real FFT gives the DCT-II: the even samples, then the odd ones
    reversed; by two strided copies (faster than ``index_select``), into ``out`` if given."""
    half = (x.shape[-1] + 1) // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    out[..., :half] = x[..., 0::2]
    out[..., half:] = x[..., 1::2].flip(-1)
    return out


def makhoul_restore(v: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`makhoul_reorder`."""
    half = (v.shape[-1] + 1) // 2
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    out[..., 0::2] = v[..., :half]
    out[..., 1::2] = v[..., half:].flip(-1)
    return out


@functools.lru_cache(maxsize=64)
def _tables(n: int, dtype: torch.dtype, device: torch.device):
    """Cached per length: exp(-i pi k / 2n) for the n // 2 + 1 bins of an rfft and the orthonormal scale of each
    output index."""
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    twiddle = torch.exp(-1j * math.pi * k / (2 * n))
    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    return twiddle.to(device=device, dtype=complex_dtype), dct_scale(n).to(device=device, dtype=dtype)


def _dct_last(x: torch.Tensor) -> torch.Tensor:
    # Makhoul with a real FFT: C_k = Re(W_k V_k) for the rfft's bins k <= n/2, and C_{n-k} = -Im(W_k V_k) above.
    n = x.shape[-1]
    twiddle, scale = _tables(n, x.dtype, x.device)
    t = torch.fft.rfft(makhoul_reorder(x), dim=-1) * twiddle
    return torch.cat([t.real, -t.imag[..., 1:(n + 1) // 2].flip(-1)], dim=-1) * scale


def _idct_last(x: torch.Tensor) -> torch.Tensor:
    # The inverse: the rfft bins V_k = conj(W_k) (c_k - i c_{n-k}) (c = x / scale, c_n = 0), one inverse real FFT,
    # then the samples back from Makhoul's order.
    n = x.shape[-1]
    twiddle, scale = _tables(n, x.dtype, x.device)
    c = x / scale
    bins = n // 2 + 1
    mirrored = torch.cat([torch.zeros_like(c[..., :1]), c[..., n - bins + 1:].flip(-1)], dim=-1)
    v = torch.fft.irfft(torch.complex(c[..., :bins], -mirrored) * twiddle.conj(), n=n, dim=-1)
    return makhoul_restore(v)


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
