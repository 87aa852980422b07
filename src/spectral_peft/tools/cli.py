"""spectral-peft: fine-tune with LoCA, S2FT, FourierFT, LoRA or full fine-tuning; evaluate; compare.

    spectral-peft finetune --method loca --n-frequency 300 --output runs/loca      # MiniLM + BBC News, offline
    spectral-peft evaluate --adapter runs/loca
    spectral-peft compare --methods loca,s2ft,lora,fourierft --budgets 100,300,1000 --ranks 1,4,8 \\
        --seeds 0,1,2 --output runs/grid
    spectral-peft bench --shapes minilm llama linear --output runs/bench
    spectral-peft analyze --tuned runs/full --output runs/full-analysis          # the spectrum of a weight change

Bad input (a missing file, a malformed dataset, an unknown method or model) gives one line on stderr and exit code 2.

The parser is built from light modules only; each command imports torch and the library when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from . import arguments
from .errors import TrainingError, UsageError

PROG = "spectral-peft"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised as UsageError, printed by main) instead of usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _Version(argparse.Action):
    """``--version``: the library's version, read only when asked for (importing the library imports torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from spectral_peft import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="Run '%(prog)s COMMAND --help' for a command's options.")
    parser.add_argument("--version", action=_Version, help="show program's version number and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_command(commands, "finetune", arguments.add_finetune_arguments, _run("finetune", "run_finetune"),
                 help="train one method on one model and task, write the adapter and metrics",
                 description="Fine-tune one method; writes the adapter, run.json, metrics.json (last) and "
                             "training.png to --output.")
    _add_command(commands, "evaluate", arguments.add_evaluate_arguments, _run("finetune", "run_evaluate"),
                 help="reload a finished run in this process and recompute its test metrics",
                 description="Rebuild base model + adapter from a finetune output folder, recompute the metrics and "
                             "print them next to metrics.json's. Exit code 0 when they match, 1 when not.")
    _add_command(commands, "compare", arguments.add_compare_arguments, _run("compare", "run_compare"),
                 help="run a grid of methods x budgets x seeds, write results.json / .md / .png",
                 description="Run every (method, budget, seed) cell into OUTPUT/cells/<method>-<budget>-seed<seed>/ "
                             "(cells with metrics.json are skipped, interrupted ones resumed), then write "
                             "results.json, results.md and results.png and print the table.")
    _add_command(commands, "bench", arguments.add_bench_arguments, _run("bench", "run_bench"),
                 help="time training steps, memory and inference of every method side by side",
                 description="Measure one training step (and the adapter's overhead over the base model), peak "
                             "memory and merged / unmerged inference for each method, interleaved in one process, "
                             "with ratios to stock LoRA; writes bench.json and bench.md to --output.")
    _add_command(commands, "analyze", arguments.add_analyze_arguments, _run("analyze", "run_analyze"),
                 help="measure the spectrum of a weight change (full fine-tuning or an adapter)",
                 description="For each target matrix's dW (--tuned minus --base, or an adapter's): energy in the "
                             "top-k DCT / DFT coefficients in the original, a random, and S2FT orderings; spectral "
                             "flatness; error at equal parameter budgets against the best low-rank approximation; "
                             "an adapter's locations against the full dW. Writes analysis.md, analysis.json, "
                             "energy.png and errors.png to --output.")
    return parser


def _add_command(commands, name: str, add_arguments, func, help: str, description: str) -> None:
    command = commands.add_parser(name, help=help, description=description)
    add_arguments(command)
    command.set_defaults(func=func)


def _run(module: str, function: str):
    """A command's function, imported from its module only when the command runs."""

    def run(args) -> int:
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(args)

    return run


def main(argv: Optional[list] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (a finetune run continues from its last checkpoint with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
