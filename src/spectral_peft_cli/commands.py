"""The parser of every command, the checks each runs before the library loads, and the entry point."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from . import arguments, checks
from .errors import Problems, TrainingError, UsageError, report_error

PROG = "spectral-peft"
# set in the environment of a compare cell's process: its interruption is reported by compare alone
CELL_ENV = "SPECTRAL_PEFT_CELL"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised as UsageError, printed by main) instead of usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _Version(argparse.Action):
    """``--version``: the library's version, read only when asked for (importing the library imports torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("spectral-peft")
        except PackageNotFoundError:
            from spectral_peft import __version__ as found
        print(f"{parser.prog} {found}")
        parser.exit()


@dataclass(frozen=True)
class Command:
    name: str
    add_arguments: Callable
    check: Callable  # (args, problems): the input's problems, found without the library
    module: str  # in spectral_peft.tools
    function: str
    help: str
    description: str


COMMANDS = (
    Command("finetune", arguments.add_finetune_arguments, checks.check_finetune, "finetune", "run_finetune",
            help="train one method on one model and task, write the adapter and metrics",
            description="Fine-tune one method; measures the base model first, then writes the adapter, run.json, "
                        "metrics.json (last) and training.png to --output."),
    Command("evaluate", arguments.add_evaluate_arguments, checks.check_evaluate, "evaluate", "run_evaluate",
            help="reload a finished run in this process and recompute its test metrics",
            description="Rebuild base model + adapter from a finetune output folder, recompute the metrics and print "
                        "them next to metrics.json's. Exit code 0 when they match, 1 when not."),
    Command("compare", arguments.add_compare_arguments, checks.check_compare, "compare", "run_compare",
            help="run a grid of methods x budgets x seeds, write results.json / .md / .png",
            description="Run every (method, budget, seed) cell into OUTPUT/cells/<method>-<budget>-seed<seed>/ "
                        "(cells with metrics.json are skipped, interrupted ones resumed), then write results.json, "
                        "results.md and results.png and print the table, with the base model's row."),
    Command("bench", arguments.add_bench_arguments, checks.check_nothing, "bench", "run_bench",
            help="time training steps, memory and inference of every method side by side",
            description="Measure one training step (and the adapter's overhead over the base model), peak memory and "
                        "merged / unmerged inference for each method, interleaved in one process, with ratios to "
                        "stock LoRA; writes bench.json and bench.md to --output."),
    Command("analyze", arguments.add_analyze_arguments, checks.check_analyze, "analyze", "run_analyze",
            help="measure the spectrum of a weight change (full fine-tuning or an adapter)",
            description="For each target matrix's dW (--tuned minus --base, or an adapter's): energy in the top-k DCT "
                        "/ DFT coefficients in the original, a random, and S2FT orderings; spectral flatness; error "
                        "at equal parameter budgets against the best low-rank approximation; an adapter's locations "
                        "against the full dW. Writes analysis.md, analysis.json, energy.png and errors.png to "
                        "--output."),
)


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    parser = _Parser(prog=PROG, description=doc.split("\n\n")[0],
                     epilog="Run '%(prog)s COMMAND --help' for a command's options.")
    parser.add_argument("--version", action=_Version, help="show program's version number and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(sub)
        sub.set_defaults(func=_run(command))
    return parser


def _run(command: Command):
    """Checks the input, then imports the command from ``spectral_peft.tools`` (torch, the library) and runs it."""

    def run(args) -> int:
        problems = Problems()
        command.check(args, problems)
        problems.check()
        return getattr(importlib.import_module(f"spectral_peft.tools.{command.module}"), command.function)(args)

    return run


def _interrupted(command: Optional[str]) -> None:
    if os.environ.get(CELL_ENV):
        return  # compare reports it
    if command == "compare":
        print(f"{PROG}: interrupted; rerun the same compare command to continue (finished cells are skipped, the "
              "interrupted cell resumes from its last checkpoint)", file=sys.stderr)
    elif command == "finetune":
        print(f"{PROG}: interrupted; rerun the same finetune command with --resume to continue from the last "
              "checkpoint", file=sys.stderr)
    else:
        print(f"{PROG}: interrupted", file=sys.stderr)


def main(argv: Optional[list] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except (UsageError, TrainingError) as error:
        return report_error(error)
    except KeyboardInterrupt:
        _interrupted(getattr(args, "command", None))
        return 130
