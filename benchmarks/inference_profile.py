"""Where an unmerged inference pass of the Llama-style benchmark model spends its time, per operation.

    HF_HUB_OFFLINE=1 python benchmarks/inference_profile.py [--method loca] [--passes 3] [--threads 2]

Builds the model of ``spectral-peft bench --shapes llama`` (batch 4 x 256) with one method, runs two warm-up
passes under ``torch.no_grad``, then profiles ``--passes`` more with ``torch.profiler`` and prints the operations by
their own CPU time. ``aten::mm`` is the frozen weights' products; the activation path is ``_SpectralActivationProduct``
(its own row: Python between the operations) with ``aten::addmm`` (the sparse product), ``aten::_fft_r2c`` /
``aten::_fft_c2r``, ``aten::gather`` and ``aten::scatter_add_`` (the reorders) under it. The profiler adds its
own cost to every operation, so compare the rows with one another, not with the benchmark's times.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from spectral_peft.tools import bench, workloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="loca", choices=workloads.VARIANTS)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = workloads.workload("llama", "cpu", torch.float32)
    model = workloads.build_variant(args.method, work, 1000, 8).eval()
    infer = bench.inference_fn(model, work)
    for _ in range(2):
        infer()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.passes):
            infer()
    print(f"{args.method}, {args.passes} passes; per pass = the totals / {args.passes}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    sys.exit(main())
