"""What one adapted layer call costs on one token, with its tables warm in cache and after they were pushed out: the
figures behind docs/performance.md's "One token at a time".

    python benchmarks/one_token_call.py [--threads 2]

The activation path of one 2048 x 2048 layer (n=1000, DCT) on one token, added into a (1, 2048) output: alone in a
loop; right after a 2048 x 2048 matrix-vector product (what the base layer does before it); and right after reading
64 MB, twice this machine's last-level cache. Median of 180 calls after 20, in microseconds, two rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from spectral_peft import spectral


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = spectral.Spectrum(torch.randn(1000), spectral.random_cells((2048, 2048), 1000), 2048, 2048, 1.0)
    x, out = torch.randn(1, 2048), torch.randn(1, 2048)
    weight, large = torch.randn(2048, 2048), torch.randn(16 << 20)

    def median_us(before) -> float:
        times = []
        with torch.no_grad():
            for _ in range(200):
                before()
                start = time.perf_counter()
                spectral.apply_delta(x, spec, out=out)
                times.append(time.perf_counter() - start)
        return statistics.median(times[20:]) * 1e6

    for _ in range(2):
        print(f"alone {median_us(lambda: None):.0f} us   after the base layer's product "
              f"{median_us(lambda: x @ weight.t()):.0f} us   after reading 64 MB {median_us(large.sum):.0f} us",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
