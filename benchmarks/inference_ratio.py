"""Unmerged inference of the Llama-style benchmark model only, for a chosen set of methods: a quick check of the
ratio to LoRA without the training steps of ``spectral-peft bench`` (about 2 minutes instead of 14).

    HF_HUB_OFFLINE=1 python benchmarks/inference_ratio.py --methods base lora loca s2ft fastfourierft [--rounds 8]
        [--toggle _BLOCK_MIN_ROWS=16,128] [--batch-size 1 --length 1]

Same model, batch and builders as the benchmark; interleaved after 2 warm-up rounds. Prints each method's median
and the two ratios to LoRA the benchmark reports (of the medians; median of the per-round ratios). ``--toggle
NAME=A,B`` compares settings of the activation path inside one process: each of our methods runs once per value,
with ``spectral_peft.spectral.NAME`` set to it (an integer) before each call. ``--batch-size`` and ``--length`` change
the tokens of the timed pass (the adapters are still built on the benchmark's 4 x 256 batch, which S2FT's prior
reads): ``--batch-size 1 --length 1`` times one token through the model, as generating without a cache of past keys
and values would.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

from spectral_peft import spectral
from spectral_peft.tools import bench, workloads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["base", "lora", "loca", "s2ft", "fastfourierft"],
                        choices=("base",) + workloads.VARIANTS)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--toggle", default=None, metavar="NAME=A,B",
                        help="a setting of spectral_peft.spectral and the integer values to run each method with")
    args = parser.parse_args()
    if "lora" not in args.methods:
        parser.error("--methods must include lora, the reference")
    if args.batch_size <= 0 or args.length <= 0:
        parser.error("--batch-size and --length must be positive")
    setting, values = None, [None]
    if args.toggle is not None:
        setting, _, listed = args.toggle.partition("=")
        if not hasattr(spectral, setting) or not all(v.strip().lstrip("-").isdigit() for v in listed.split(",")):
            parser.error(f"--toggle: expected NAME=A,B with NAME a setting of spectral_peft.spectral and integer "
                         f"values, got {args.toggle!r}")
        values = [int(value) for value in listed.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = workloads.workload("llama", "cpu", torch.float32)
    models = {name: workloads.build_variant(name, work, 1000, 8).eval() for name in args.methods}
    ids = torch.randint(0, 1000, (args.batch_size, args.length))
    work.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calls = {}
    for name, model in models.items():
        infer = bench.inference_fn(model, work)
        if name in ("base", "lora") or setting is None:
            calls[name] = infer
            continue
        for value in values:
            calls[f"{name} {setting}={value}"] = functools.partial(_with_setting, infer, setting, value)
    times = bench.interleaved(calls, args.rounds, 2, "cpu")
    lora = times["lora"]
    for name, t in times.items():
        ratio, paired = statistics.median(t) / statistics.median(lora), bench.paired_ratio(t, lora)
        print(f"{name:35s} {statistics.median(t) * 1e3:8.1f} ms   / LoRA {ratio:.3f} / {paired:.3f}")


def _with_setting(infer, setting: str, value: int) -> None:
    setattr(spectral, setting, value)
    infer()


if __name__ == "__main__":
    sys.exit(main())
