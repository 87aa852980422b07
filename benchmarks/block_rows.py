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
import statistics
import sys
import time

import torch

from spectral_peft import spectral

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
    times = {(shape, floor): [] for shape in SHAPES for floor in FLOORS}
    with torch.no_grad():
        for _ in range(args.rounds + 3):  # the first three rounds warm up
            for floor in FLOORS:
                spectral._BLOCK_MIN_ROWS = floor
                for shape, (spec, x, y) in cases.items():
                    start = time.perf_counter()
                    spectral.apply_delta(x, spec, out=y)
                    times[(shape, floor)].append(time.perf_counter() - start)
    for shape in SHAPES:
        first = times[(shape, FLOORS[0])][3:]
        cells = []
        for floor in FLOORS:
            kept = times[(shape, floor)][3:]
            paired = statistics.median(a / b for a, b in zip(kept, first))
            cells.append(f"{floor} rows: {statistics.median(kept) * 1e3:.2f} ms ({paired:.3f})")
        print(f"{shape[0]} x {shape[1]}, {SHAPES[shape]} tokens:  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    sys.exit(main())
