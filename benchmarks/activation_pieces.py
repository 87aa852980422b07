"""The pieces of one block of the activation path, timed alone: the figures behind docs/performance.md's
"Where unmerged inference stands".

    python benchmarks/activation_pieces.py [--threads 2]

A 128 x 2048 block (a 2048 x 2048 layer, n=1000, DCT): the rfft on one row and on the block (torch's MKL backend
plans every call anew), the reorders as a gather / scatter-add against Makhoul's strided copies, and the sparse
product as it runs (tokens in rows, into a transposed view) against the tokens-innermost layout with and without
the two transposes that layout needs. Median of 300 calls after 20 warm-ups, in microseconds.

Then the same layer's whole call on one token ("One token at a time"), added into a (1, 2048) output: alone in a
loop; right after a 2048 x 2048 matrix-vector product (what the base layer does before it); and right after reading
64 MB, twice this machine's last-level cache. Median of 180 calls after 20, two rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from spectral_peft import spectral
from spectral_peft.tools.bench import interleaved
from spectral_peft.transforms import makhoul_reorder


def _us(call, repeats: int = 300, before=None) -> float:
    """Median of ``repeats`` calls after 20 warm-ups, in microseconds; ``before`` runs untimed ahead of each call."""
    return statistics.median(interleaved({"call": call}, repeats, 20, "cpu", before)["call"]) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, width = 128, 2048
    x, target = torch.randn(rows, width), torch.randn(rows, width)
    buffer, spectrum = torch.empty(rows, width), torch.empty(rows, width // 2 + 1, dtype=torch.complex64)
    order = makhoul_reorder(torch.arange(width))
    half = (width + 1) // 2

    def strided_restore_add():  # the form the activation path used before its scatter_add_
        target[:, 0::2] += x[:, :half]
        target[:, 1::2] += x[:, half:].flip(-1)

    spec = spectral.Spectrum(torch.randn(1000), spectral.random_cells((width, width), 1000), width, width, 1.0)
    structure = spectral._structure(spec, torch.float32)
    _, factor, pair = structure.entries
    q = structure.pattern.matrix(factor * spec.coefficients[pair])
    dense, out = torch.randn(rows, q.shape[1]), torch.empty(rows, q.shape[0])
    dense_t, out_t = torch.empty(q.shape[1], rows), torch.empty(q.shape[0], rows)

    def tokens_innermost_with_transposes():
        dense_t.copy_(dense.t())
        torch.addmm(out_t, q, dense_t, beta=0.0, out=out_t)
        out.copy_(out_t.t())

    figures = {
        "rfft, 1 row": lambda: torch.fft.rfft(x[:1], dim=-1, out=spectrum[:1]),
        f"rfft, {rows} rows": lambda: torch.fft.rfft(x, dim=-1, out=spectrum),
        "reorder: gather": lambda: torch.gather(x, -1, order.expand(x.shape), out=buffer),
        "reorder: Makhoul's strided copies": lambda: makhoul_reorder(x, out=buffer),
        "reorder back and add: scatter_add_": lambda: target.scatter_add_(-1, order.expand(x.shape), x),
        "reorder back and add: strided adds": strided_restore_add,
        "sparse product, tokens in rows (as used)": lambda: torch.addmm(out.t(), q, dense.t(), beta=0.0, out=out.t()),
        "sparse product, tokens innermost": lambda: torch.addmm(out_t, q, dense_t, beta=0.0, out=out_t),
        "sparse product, tokens innermost + transposes": tokens_innermost_with_transposes,
    }
    print(f"| piece ({rows} x {width} block, n=1000) | us |\n|---|---|")
    for name, call in figures.items():
        print(f"| {name} | {_us(call):.0f} |", flush=True)
    _one_token_call(spec)


def _one_token_call(spec: spectral.Spectrum) -> None:
    x, out = torch.randn(1, spec.in_features), torch.randn(1, spec.out_features)
    weight, large = torch.randn(spec.out_features, spec.in_features), torch.randn(16 << 20)

    def call() -> None:
        with torch.no_grad():
            spectral.apply_delta(x, spec, out=out)

    for _ in range(2):
        alone, after_product, after_flush = (_us(call, 180, before) for before in (None, lambda: x @ weight.t(),
                                                                                  large.sum))
        print(f"one token: alone {alone:.0f} us, after the base layer's product {after_product:.0f} us, "
              f"after reading 64 MB {after_flush:.0f} us", flush=True)


if __name__ == "__main__":
    sys.exit(main())
