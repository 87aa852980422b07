"""Where a whole model's training step goes, operation by operation, for LoRA and our methods side by side.

    python benchmarks/step_profile.py [--shape llama-1024] [--methods lora loca fastfourierft] [--threads 1]

Builds ``spectral-peft bench``'s workload for ``--shape`` (its models and batch, and an AdamW step), times ``--rounds``
interleaved training steps of every method (median, and the ratio to the first method), then records
``--profiled`` steps of each with torch's profiler and prints one table: each operation's own CPU time and calls
per step for every method, the operations that differ most from the first method first. ``aten::copy_`` counts
copies, ``aten::empty`` allocations, and the rows named after our autograd Functions the Python between
operations. The profiler adds its own cost to every call: read its rows against each other, the timed steps for
the ratio.
"""

from __future__ import annotations

import argparse

import torch
from layer_costs import median_ms, profile_ops  # beside this script

from spectral_peft.tools.workloads import build_variant, workload


def _stepper(work, model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        work.loss(model, work.batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-1024", choices=("minilm", "minilm-short", "llama", "llama-1024"))
    parser.add_argument("--methods", nargs="+", default=["lora", "loca", "fastfourierft"])
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profiled", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = workload(args.shape, torch.device("cpu"), torch.float32, random_weights=True)
    steps = {m: _stepper(work, build_variant(m, work, args.n_frequency, args.rank)) for m in args.methods}
    for step in steps.values():  # warm-up: kept structures and optimizer state built
        step(), step()
    medians = median_ms(steps, args.rounds)
    first = args.methods[0]
    print(f"\n## {args.shape}, {args.threads} thread(s): training step, median of {args.rounds} interleaved rounds\n")
    print(" | ".join(f"{m} {ms:.0f} ms ({ms / medians[first]:.2f}x)" for m, ms in medians.items()))
    profiles = {m: profile_ops(step, args.profiled) for m, step in steps.items()}
    keys = set().union(*profiles.values())

    def spread(key):
        own = [profiles[m].get(key, (0.0, 0))[0] for m in args.methods]
        return max(abs(v - own[0]) for v in own)

    print(f"\nown CPU ms per step (calls per step), profiled over {args.profiled} steps; total of all operations last\n")
    print("| operation | " + " | ".join(args.methods) + " |")
    print("|---" * (len(args.methods) + 1) + "|")
    for key in sorted(keys, key=spread, reverse=True)[: args.top]:
        cells = [profiles[m].get(key, (0.0, 0)) for m in args.methods]
        print(f"| {key} | " + " | ".join(f"{ms:.1f} ({calls:g})" for ms, calls in cells) + " |")
    print("| all operations | " + " | ".join(f"{sum(v[0] for v in profiles[m].values()):.1f}" for m in args.methods)
          + " |")


if __name__ == "__main__":
    main()
