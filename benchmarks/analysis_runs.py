"""The measurements behind docs/analysis.md: `spectral-peft analyze` on the full fine-tuning runs and the LoCA / S2FT
adapters of docs/results.md's grid, then the tables of the doc (mean over seeds) printed as markdown.

    python benchmarks/analysis_runs.py --cells runs/results/grid/cells --output runs/analysis

Each analysis goes to OUTPUT/<name>/ (skipped when its analysis.json exists). Full runs: every changed Linear weight
with a gradient prior (4 batches); adapters: their query/value targets against the full run of the same seed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

SEEDS = (0, 1, 2)
BUDGETS = (100, 300, 1000)


def analyze(cells: pathlib.Path, output: pathlib.Path, name: str, *extra: str) -> dict:
    folder = output / name
    if not (folder / "analysis.json").is_file():
        command = [sys.executable, "-m", "spectral_peft", "analyze", *extra, "--output", str(folder), "--threads",
                   "1", "--quiet"]
        print(" ".join(command[2:]), file=sys.stderr)
        subprocess.run(command, check=True)
    return json.loads((folder / "analysis.json").read_text())


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="runs/results/grid/cells")
    parser.add_argument("--output", default="runs/analysis")
    args = parser.parse_args()
    cells, output = pathlib.Path(args.cells), pathlib.Path(args.output)

    full = {s: analyze(cells, output, f"full-seed{s}", "--tuned", str(cells / f"full-all-seed{s}")) for s in SEEDS}
    one = full[0]["fractions"].index(0.01)
    print("| seed | matrices | DCT top 1%: original | random | self | prior | DFT original | white noise | "
          "noise, self | flatness DCT (noise) | flatness DFT (noise) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, result in full.items():
        energy = result["summary"]["all"]["energy"]
        noise = result["white_noise"]["384x384"]
        flat = result["summary"]["all"]["flatness"]
        print(f"| {s} | {len(result['matrices'])} | " + " | ".join(
            f"{100 * energy['dct'][o][one]:.1f}%" for o in ("original", "random", "self", "prior"))
            + f" | {100 * energy['dft']['original'][one]:.1f}% | {100 * noise['dct']['original']['energy'][one]:.1f}% "
            f"| {100 * noise['dct']['self']['energy'][one]:.1f}% | {flat['dct']['original']:.3f} "
            f"({noise['dct']['original']['flatness']:.3f}) | {flat['dft']['original']:.3f} "
            f"({noise['dft']['original']['flatness']:.3f}) |")
    print()
    keys = ("svd", "dct_top", "dct_top_3n", "dct_random", "dct_s2ft_self", "dct_s2ft_prior", "dft_top")
    print("| rank r | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for index, rank in enumerate(full[0]["ranks"]):
        rows = [result["summary"]["all"]["errors"][index] for result in full.values()]
        print(f"| {rank} | " + " | ".join(f"{mean(r[k] for r in rows):.3f}" for k in keys) + " |")
    print()
    names = ("dct_top_beats_svd", "dct_top_3n_beats_svd", "dct_random_worse_than_svd", "dct_s2ft_self_beats_svd",
             "dct_s2ft_prior_beats_svd", "self_ordering_raises_1pct", "prior_ordering_raises_1pct",
             "prior_ordering_beats_random_1pct", "dct_beats_dft_1pct")
    print("| seed | pairs | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for s, result in full.items():
        counts = result["counts"]
        print(f"| {s} | {counts['pairs']} | " + " | ".join(str(counts[n]) for n in names) + " |")
    print()

    print("| adapter | n | overlap with top-n | random overlap | energy at locations | top-n energy | distance | "
          "initial energy | initial distance | moved |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in ("loca", "s2ft"):
        for n in BUDGETS:
            records = []
            for s in SEEDS:
                result = analyze(cells, output, f"{method}-n{n}-seed{s}", "--tuned", str(cells / f"full-all-seed{s}"),
                                 "--adapter", str(cells / f"{method}-n{n}-seed{s}"), "--target-modules",
                                 "query,value")
                records += [r["locations"] for r in result["matrices"] if r.get("locations")]

            def col(key, scale=100.0, unit="%", digits=1):
                values = [r.get(key) for r in records]
                if all(v is None for v in values):
                    return "-"
                return f"{scale * mean(values):.{digits}f}{unit}"

            print(f"| {method} | {n} | {col('overlap')} | {col('expected_random_overlap', digits=2)} | "
                  f"{col('energy_share', digits=2)} | {col('top_n_energy_share')} | {col('mean_distance', 1, '')} | "
                  f"{col('initial_energy_share', digits=2)} | {col('initial_mean_distance', 1, '')} | "
                  f"{col('moved')} |")


if __name__ == "__main__":
    main()
