"""How many rows a block of the activation path should have: the forward of one layer (inference, added into the
layer's output) on a 2-core CPU, for the floor on the rows per block (``spectral._BLOCK_MIN_ROWS``) the path
used before (16), and 64, 96 and 128 (used since), toggled around each call in one process.

    python benchmarks/block_rows.py [--threads 2] [--rounds 14]

Shapes (out x in): the Llama-style benchmark's 2048 x 2048, 5632 x 2048 (gate, up) and 2048 x 5632 (down) at 1024
tokens, Llama-7B's 11008 x 4096 at 1024 tokens and MiniLM's 384 x 384 at 4096 tokens; n=1000, DCT. Prints each
setting's median in ms and the median of its per-round ratios to the first setting.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

from spectral_peft import spectral
from spectral_peft.tools import bench

SHAPES = {(2048, 2048): 1024, (5632, 2048): 1024, (2048, 5632): 1024, (11008, 4096): 1024, (384, 384): 4096}
FLOORS = (16, 64, 96, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {}
    for (m, n), tokens in SHAPES.items():
        spec = spectral.Spectrum(torch.randn(1000), spectral.random_cells((m, n), 1000), m, n, 1.0)
        cases[(m, n)] = (spec, torch.randn(tokens, n), torch.randn(tokens, m))
    calls = {(shape, floor): functools.partial(_with_floor, floor, *case)
             for floor in FLOORS for shape, case in cases.items()}
    with torch.no_grad():
        times = bench.interleaved(calls, args.rounds, 3, "cpu")
    for shape in SHAPES:
        first = times[(shape, FLOORS[0])]
        cells = []
        for floor in FLOORS:
            kept = times[(shape, floor)]
            cells.append(f"{floor} rows: {statistics.median(kept) * 1e3:.2f} ms "
                         f"({bench.paired_ratio(kept, first):.3f})")
        print(f"{shape[0]} x {shape[1]}, {SHAPES[shape]} tokens:  " + "  ".join(cells), flush=True)


def _with_floor(floor: int, spec: spectral.Spectrum, x: torch.Tensor, out: torch.Tensor) -> None:
    spectral._BLOCK_MIN_ROWS = floor
    spectral.apply_delta(x, spec, out=out)


if __name__ == "__main__":
    sys.exit(main())
