"""The ablations behind docs/results.md: each mechanism against its own switched-off twin, on few-shot BBC News.

    python benchmarks/ablations.py [--output runs/ablations] [--seeds 0,1,2,3,4] [--budget 1000] [--shots 4]

The setting (written to OUTPUT/bbc-news-<shots>-shot.csv, with a split column): BBC News with ``--shots`` training
articles per topic, 20 per topic for validation and 100 per topic for test, one fixed draw (``--draw-seed``) from
the 2,225 articles; 32 tokens per article (``--max-length``), 40 AdamW steps of batch 8. The seeds change the
initialisation, the random locations, the S2FT warm-up's batches and the data order, not the split, so every method
of a seed sees the same examples and the spread is the training's alone.

1. Tuning, the same for every method: seeds 0 and 1, the budget (n=--budget for the spectral methods, LoRA r=8,
   full), the registry's learning rate x 1/3, x 1, x 3 and x 9 (a 40-step run wants larger rates than the
   registry's); the best mean validation accuracy over the two seeds wins (ties: lower mean validation loss). The test split is not looked at. LoRA r=1 takes r=8's rate.
2. The grid: every method at the tuned rate, every seed (``spectral-peft compare``).
3. Each switched-off twin whose tuned rate differs from its mechanism's also runs at the mechanism's rate
   (OUTPUT/grid-same-lr): the tuning's noise (one validation answer is 0.5%) must not decide a verdict alone.
4. OUTPUT/ablations.md: one table per mechanism with the mean ± std over seeds, the paired difference against the
   mechanism switched off, and a verdict: "helps" / "hurts" where the difference of the means is larger than both
   methods' standard deviations over seeds, "no measurable effect" otherwise.

Everything goes through ``spectral-peft compare``: an interrupted run continues where it stopped. ``--options``
passes more finetune options to every cell (docs/results.md: ``--s2ft-prior-optimizer adam``); ``--tag`` names a
variant of the whole study (its own tuning and grid folders).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import random
import shlex
import shutil
import subprocess
import sys

from spectral_peft.tools.checkpoints import METRICS_FILE
from spectral_peft.tools.data import BBC_NEWS_LABELS, load_bbc_news
from spectral_peft.tools.methods import METHODS as REGISTRY

SPECTRAL = ("loca", "loca-frozen", "dct-prior", "s2ft", "s2ft-unordered", "s2ft-random", "fourierft")
TUNED = SPECTRAL + ("lora", "full")
FACTORS = (1 / 3, 1.0, 3.0, 9.0)
TUNING_SEEDS = (0, 1)
# (mechanism, the method with it, the methods without it)
MECHANISMS = (
    ("LoCA's learned locations", "loca", ("loca-frozen", "dct-prior")),
    ("S2FT's reordering", "s2ft", ("s2ft-unordered", "s2ft-random", "fourierft")),
)


def write_task(path: pathlib.Path, shots: int, validation: int, test: int, draw_seed: int) -> None:
    """``shots`` / ``validation`` / ``test`` articles per topic, one fixed draw, in a CSV with a split column."""
    articles = [a for split in load_bbc_news(0).values() for a in split]
    rng = random.Random(draw_seed)
    rows = []
    for label, topic in enumerate(BBC_NEWS_LABELS):
        texts = sorted(a["text"] for a in articles if a["label"] == label)
        rng.shuffle(texts)
        for i, text in enumerate(texts[: shots + validation + test]):
            split = "train" if i < shots else "validation" if i < shots + validation else "test"
            rows.append({"text": text, "label": topic, "split": split})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)


def compare(output: pathlib.Path, common: list[str], methods, budget: int, ranks: str, seeds: str,
            lrs: dict) -> list[str]:
    argv = ["compare", "--methods", ",".join(methods), "--budgets", str(budget), "--ranks", ranks, "--seeds", seeds,
            "--lr", ",".join(f"{m}={lrs[m]:.3g}" for m in methods), "--output", str(output), *common]
    print("$ spectral-peft", " ".join(shlex.quote(a) for a in argv), flush=True)
    subprocess.run([sys.executable, "-m", "spectral_peft", *argv], check=True, stdout=subprocess.DEVNULL)
    return argv


def cell_name(method: str, budget: int, seed, rank: int = 8) -> str:
    kind = REGISTRY[method].budget
    size = f"n{budget}" if kind == "n_frequency" else f"r{rank}" if kind == "rank" else "all"
    return f"{method}-{size}-seed{seed}"


def tune(output: pathlib.Path, common: list[str], budget: int) -> dict:
    trials = {}
    seeds = ",".join(map(str, TUNING_SEEDS))
    for factor in FACTORS:
        lrs = {m: REGISTRY[m].lr * factor for m in TUNED}
        folder = output / f"tune-x{factor:.2f}"
        compare(folder, common, TUNED, budget, "8", seeds, lrs)
        for method in TUNED:
            cells = [folder / "cells" / cell_name(method, budget, seed) for seed in TUNING_SEEDS]
            last = [json.loads((cell / METRICS_FILE).read_text())["validation"][-1] for cell in cells]
            trials.setdefault(method, []).append({
                "lr": lrs[method], "accuracy": sum(v["accuracy"] for v in last) / len(last),
                "loss": sum(v["loss"] for v in last) / len(last), "cells": [str(cell) for cell in cells]})
    chosen = {m: max(t, key=lambda x: (x["accuracy"], -x["loss"]))["lr"] for m, t in trials.items()}
    (output / "tuned_lr.json").write_text(json.dumps({"trials": trials, "chosen": chosen}, indent=1))
    return {"trials": trials, "chosen": chosen}


def _stats(values: list) -> tuple:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def verdict(with_values: list, without_values: list) -> str:
    (a, sa), (b, sb) = _stats(with_values), _stats(without_values)
    if a - b > max(sa, sb):
        return "helps"
    if b - a > max(sa, sb):
        return "hurts"
    return "no measurable effect"


def report(grid: pathlib.Path, budget: int, seeds: list, tuning: dict, command: str, same_lr: pathlib.Path,
           twins: dict) -> str:
    results = {}
    for method in TUNED:
        for rank in ((1, 8) if method == "lora" else (8,)):
            key = f"lora r{rank}" if method == "lora" else method
            values, params, locations = [], None, 0
            for seed in seeds:
                metrics = json.loads((grid / "cells" / cell_name(method, budget, seed, rank) / METRICS_FILE).read_text())
                values.append(metrics["test"]["accuracy"])
                params, locations = metrics["adapter_params"], metrics.get("location_params", 0)
            results[key] = {"values": values, "params": params, "locations": locations,
                            "lr": tuning["chosen"]["lora" if method == "lora" else method]}
    for method, lr in twins.items():
        values = [json.loads((same_lr / "cells" / cell_name(method, budget, seed) / METRICS_FILE).read_text())
                  ["test"]["accuracy"] for seed in seeds]
        results[f"{method} at the mechanism's lr"] = {**results[method], "values": values, "lr": lr}
    lines = [f"Test accuracy over seeds {','.join(map(str, seeds))} (mean ± std; per seed in brackets). "
             f"`{command}`", ""]

    def row(name: str, against: str = None) -> str:
        r = results[name]
        mean, std = _stats(r["values"])
        params = f"{r['params']:,}" + (f" (+{r['locations']:,} locations)" if r["locations"] else "")
        cells = [name, params, f"{r['lr']:.3g}", f"{mean:.4f} ± {std:.4f}", " ".join(f"{v:.3f}" for v in r["values"])]
        if against is not None:
            diffs = [x - y for x, y in zip(results[against]["values"], r["values"])]
            dmean, dstd = _stats(diffs)
            wins = sum(d > 0 for d in diffs)
            cells += [f"{dmean:+.4f} ± {dstd:.4f} ({wins}/{len(diffs)} seeds)",
                      verdict(results[against]["values"], r["values"])]
        else:
            cells += ["", ""]
        return "| " + " | ".join(cells) + " |"

    header = ("| method | trained params (update) | lr | test accuracy | per seed | mechanism on minus this "
              "(paired) | verdict for the mechanism |\n|---|---|---|---|---|---|---|")
    for title, on, offs in MECHANISMS:
        rows = [row(off, against=on) for off in offs]
        rows += [row(f"{off} at the mechanism's lr", against=on) for off in offs if off in twins]
        lines += [f"### {title}", "", header, row(on)] + rows + [""]
    lines += ["### References", "", header] + [row(name) for name in ("fourierft", "lora r1", "lora r8", "full")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/ablations")
    parser.add_argument("--tag", default="", help="a variant of the study: its own tuning and grid folders")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--budget", type=int, default=1000, help="coefficients per matrix (default 1000)")
    parser.add_argument("--shots", type=int, default=4, help="training articles per topic (default 4)")
    parser.add_argument("--draw-seed", type=int, default=1234, help="the draw of the articles (default 1234)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--options", default="",
                        help="more finetune options for every cell, e.g. '--s2ft-prior-optimizer adam' or "
                             "'--location-lr 1' (default: the library's defaults)")
    args = parser.parse_args()
    output = pathlib.Path(args.output)
    task = output / f"bbc-news-{args.shots}-shot.csv"
    if not task.exists():
        write_task(task, args.shots, 20, 100, args.draw_seed)
    common = ["--task", str(task), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--eval-every", "0", "--save-every", "0", "--threads", "1",
              "--quiet", *shlex.split(args.options)]
    study = output / args.tag if args.tag else output
    tuning = tune(study, common, args.budget)
    for method, trials in tuning["trials"].items():
        print(f"  {method}: " + ", ".join(f"lr {t['lr']:.3g}: acc {t['accuracy']:.3f} loss {t['loss']:.3f}"
                                           for t in trials) + f" -> {tuning['chosen'][method]:.3g}")
    grid = study / "grid"
    for method, trials in tuning["trials"].items():  # the tuning cells of the kept rate are the grid's cells
        for cell in next(t["cells"] for t in trials if t["lr"] == tuning["chosen"][method]):
            source = pathlib.Path(cell)
            if not (grid / "cells" / source.name).exists():
                shutil.copytree(source, grid / "cells" / source.name)
    seeds = [int(s) for s in args.seeds.split(",")]
    argv = compare(grid, common, TUNED, args.budget, "1,8", args.seeds, tuning["chosen"])
    # tuning on 200 validation answers is noisy: each switched-off twin also runs at its mechanism's own rate
    twins = {off: tuning["chosen"][on] for _, on, offs in MECHANISMS for off in offs
             if off != "fourierft" and tuning["chosen"][off] != tuning["chosen"][on]}
    if twins:
        compare(study / "grid-same-lr", common, list(twins), args.budget, "8", args.seeds, twins)
    command = "python benchmarks/ablations.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = report(grid, args.budget, seeds, tuning, command.strip(), study / "grid-same-lr", twins)
    (study / "ablations.md").write_text(text)
    (study / "compare_command.txt").write_text("spectral-peft " + " ".join(shlex.quote(a) for a in argv) + "\n")
    print(text)


if __name__ == "__main__":
    main()
