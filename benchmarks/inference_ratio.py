"""Unmerged inference of the Llama-style benchmark model only, for a chosen set of methods: a quick check of the
ratio to LoRA without the training steps of ``spectral-peft bench`` (about 2 minutes instead of 14).

    HF_HUB_OFFLINE=1 python benchmarks/inference_ratio.py --methods base lora loca s2ft fastfourierft [--rounds 8]

Same model, batch and builders as the benchmark; interleaved after 2 warm-up rounds. Prints each method's median
and the two ratios to LoRA the benchmark reports (of the medians; median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from spectral_peft import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["base", "lora", "loca", "s2ft", "fastfourierft"],
                        choices=("base",) + bench.METHODS)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if "lora" not in args.methods:
        parser.error("--methods must include lora, the reference")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = bench._workload("llama", "cpu", torch.float32)
    calls = {name: bench._inference_fn(bench._build(name, work, 1000, 8).eval(), work) for name in args.methods}
    times = bench._interleaved(calls, args.rounds, 2, "cpu")
    lora = times["lora"]
    for name, t in times.items():
        print(f"{name:15s} {statistics.median(t) * 1e3:7.0f} ms   / LoRA {statistics.median(t) / statistics.median(lora):.3f}"
              f" / {bench._paired_ratio(t, lora):.3f}")


if __name__ == "__main__":
    sys.exit(main())
