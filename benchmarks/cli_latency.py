"""How long the command line takes to answer help and bad input: wall time of a fresh process, median of --repeats.

    python benchmarks/cli_latency.py [--repeats 5] [--command "python -m spectral_peft"]

--command: how to start the command (default: the `spectral-peft` console script beside this Python, else
`python -m spectral_peft_cli`); the cases make their own small files in a temporary folder. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def cases(folder: pathlib.Path) -> dict:
    """Name -> (arguments, the exit code expected)."""
    tweets = folder / "tweets.csv"
    tweets.write_bytes("id,sentiment,tweet\n1,positive,très bon café\n".encode("latin-1"))
    out = str(folder / "out")
    return {
        "--help": (["--help"], 0),
        "finetune --help": (["finetune", "--help"], 0),
        "evaluate --help": (["evaluate", "--help"], 0),
        "compare --help": (["compare", "--help"], 0),
        "bench --help": (["bench", "--help"], 0),
        "analyze --help": (["analyze", "--help"], 0),
        "unknown method": (["finetune", "--method", "nonsense", "--output", out], 2),
        "missing task file": (["finetune", "--method", "loca", "--task", str(folder / "nope.csv"), "--output", out], 2),
        "wrong columns and encoding": (["finetune", "--method", "loca", "--task", str(tweets), "--output", out], 2),
        "missing model folder": (["finetune", "--method", "loca", "--model", str(folder / "no-model/"), "--output",
                                  out], 2),
        "compare, unknown method": (["compare", "--methods", "loca,nonsense", "--output", out], 2),
        "evaluate, missing run": (["evaluate", "--adapter", str(folder / "no-run")], 2),
    }


def default_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "spectral-peft"
    return [str(script)] if script.exists() else [sys.executable, "-m", "spectral_peft_cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--command", default=None, help="how to start the command (default: spectral-peft)")
    args = parser.parse_args()
    command = shlex.split(args.command) if args.command else default_command()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"`{' '.join(command)}`, {args.repeats} runs each, wall time of a fresh process (s)\n")
    print("| case | median | max |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, (argv, expected) in cases(pathlib.Path(folder)).items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = subprocess.run(command + argv, capture_output=True, text=True, env=env)
                times.append(time.perf_counter() - start)
                if result.returncode != expected:
                    sys.exit(f"{name}: exit code {result.returncode}, expected {expected}\n{result.stderr}")
            print(f"| {name} | {statistics.median(times):.2f} | {max(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
