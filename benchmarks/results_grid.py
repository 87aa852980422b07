"""The comparison behind docs/results.md: learning rates tuned on validation, then the grid over three seeds.

    python benchmarks/results_grid.py [--output runs/results] [--steps 100] [--max-length 64] [--seeds 0,1,2]

1. Tuning, the same for every method: seed 0, the middle budget (n=300 for the spectral methods, LoRA r=4, full
   fine-tuning), three learning rates per method: its default x 1/3, x 1 and x 3. The one with the best validation
   accuracy (ties: lower validation loss) is kept. The test split is not looked at.
2. The grid: every method and budget, each seed, with the kept learning rates (``spectral-peft compare``).

Everything goes through ``spectral-peft compare``, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys

from spectral_peft.tools.checkpoints import METRICS_FILE
from spectral_peft.tools.methods import METHODS as REGISTRY

METHODS = ("loca", "s2ft", "fourierft", "lora", "full")
FACTORS = (1 / 3, 1.0, 3.0)


def compare(output: pathlib.Path, common: list[str], methods, budgets: str, ranks: str, seeds: str, lrs: dict) -> None:
    argv = [sys.executable, "-m", "spectral_peft", "compare", "--methods", ",".join(methods), "--budgets", budgets,
            "--ranks", ranks, "--seeds", seeds, "--lr", ",".join(f"{m}={lr:.3g}" for m, lr in lrs.items()),
            "--output", str(output), *common]
    print("$", " ".join(argv[1:]), flush=True)
    subprocess.run(argv, check=True)


def final_validation(folder: pathlib.Path) -> dict:
    return json.loads((folder / METRICS_FILE).read_text())["validation"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/results")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    output = pathlib.Path(args.output)
    # LoCA's cycle scaled to a short run: 5 coefficient steps, 10 location steps, locations learn in the first 30%
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
              "--eval-every", "0", "--loca-coefficient-steps", "5", "--loca-location-steps", "10",
              "--location-learning-steps", str(int(0.3 * args.steps))]

    tuning = {}
    for factor in FACTORS:
        lrs = {m: REGISTRY[m].lr * factor for m in METHODS}
        folder = output / f"tune-x{factor:.2f}"
        compare(folder, common, METHODS, "300", "4", "0", lrs)
        for method in METHODS:
            cell = next((folder / "cells").glob(f"{method}-*-seed0"))
            tuning.setdefault(method, []).append((lrs[method], final_validation(cell), str(cell)))
    chosen = {}
    print("\nlearning-rate tuning (seed 0, n=300 / r=4; validation):")
    for method, trials in tuning.items():
        best = max(trials, key=lambda t: (t[1]["accuracy"], -t[1]["loss"]))
        chosen[method] = best[0]
        cells = ", ".join(f"lr {lr:.3g}: acc {v['accuracy']:.4f} loss {v['loss']:.4f}" for lr, v, _ in trials)
        print(f"  {method}: {cells} -> {best[0]:.3g}")
    (output / "tuned_lr.json").write_text(json.dumps({"trials": tuning, "chosen": chosen}, indent=1))
    # the tuning cell of the kept learning rate is the grid's seed-0 cell at that budget: not run twice
    for method, trials in tuning.items():
        source = pathlib.Path(next(cell for lr, _, cell in trials if lr == chosen[method]))
        target = output / "grid" / "cells" / source.name
        if not target.exists():
            shutil.copytree(source, target)

    compare(output / "grid", common, METHODS, "100,300,1000", "1,4,8", args.seeds, chosen)


if __name__ == "__main__":
    main()
