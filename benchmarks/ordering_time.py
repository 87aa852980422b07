"""Time of S2FT's orderings (rows and columns) on random priors of real layer shapes.

    python benchmarks/ordering_time.py [--shapes 768x768 4096x4096 4096x11008] [--refine-passes 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from spectral_peft.s2ft.ordering import nearest_neighbor_order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["768x768", "4096x4096", "4096x11008"])
    parser.add_argument("--refine-passes", type=int, nargs="+", default=[0, 3])
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        prior = torch.randn(m, 16) @ torch.randn(16, n) + 0.1 * torch.randn(m, n)
        for passes in args.refine_passes:
            start = time.perf_counter()
            nearest_neighbor_order(prior, refine_passes=passes)
            rows = time.perf_counter() - start
            start = time.perf_counter()
            nearest_neighbor_order(prior.T, refine_passes=passes)
            cols = time.perf_counter() - start
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row = {"shape": shape, "refine_passes": passes, "rows_s": round(rows, 2), "cols_s": round(cols, 2),
                   "peak_rss_mb": round(peak_mb)}
            results.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
