"""spectral-peft: fine-tune with LoCA, S2FT, FourierFT, LoRA or full fine-tuning; evaluate; compare.

    spectral-peft finetune --method loca --n-frequency 300 --output runs/loca      # MiniLM + BBC News, offline
    spectral-peft evaluate --adapter runs/loca
    spectral-peft compare --methods loca,s2ft,lora,fourierft --budgets 100,300,1000 --ranks 1,4,8 \\
        --seeds 0,1,2 --output runs/grid
    spectral-peft bench --shapes minilm llama linear --output runs/bench
    spectral-peft analyze --tuned runs/full --output runs/full-analysis          # the spectrum of a weight change

Bad input (a missing file, a malformed dataset, an unknown method or model) gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import TrainingError, UsageError

PROG = "spectral-peft"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised as UsageError, printed by main) instead of usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from .finetune import add_training_arguments

    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="Run '%(prog)s COMMAND --help' for a command's options.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    finetune = commands.add_parser(
        "finetune", help="train one method on one model and task, write the adapter and metrics",
        description="Fine-tune one method; writes the adapter, run.json, metrics.json (last) and training.png to "
                    "--output.",
    )
    add_training_arguments(finetune)
    out = finetune.add_argument_group("output")
    out.add_argument("--output", required=True, help="output folder")
    out.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint in --output (same options as the first run)")
    out.add_argument("--overwrite", action="store_true", help="replace a spectral-peft run already in --output")
    out.add_argument("--stop-after", type=int, default=None,
                     help="stop after this optimizer step, leaving a checkpoint to continue with --resume")
    finetune.set_defaults(func=_finetune)

    evaluate = commands.add_parser(
        "evaluate", help="reload a finished run in this process and recompute its test metrics",
        description="Rebuild base model + adapter from a finetune output folder, recompute the metrics and print "
                    "them next to metrics.json's. Exit code 0 when they match, 1 when not.",
    )
    evaluate.add_argument("--adapter", required=True, help="a finetune --output folder")
    evaluate.add_argument("--split", choices=("test", "validation"), default="test", help="default test")
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    evaluate.set_defaults(func=_evaluate)

    compare = commands.add_parser(
        "compare", help="run a grid of methods x budgets x seeds, write results.json / .md / .png",
        description="Run every (method, budget, seed) cell into OUTPUT/cells/<method>-<budget>-seed<seed>/ "
                    "(cells with metrics.json are skipped, interrupted ones resumed), then write results.json, "
                    "results.md and results.png and print the table.",
    )
    from .compare import add_compare_arguments

    add_compare_arguments(compare)
    add_training_arguments(compare, grid=True)
    compare.set_defaults(func=_compare)

    bench = commands.add_parser(
        "bench", help="time training steps, memory and inference of every method side by side",
        description="Measure one training step (and the adapter's overhead over the base model), peak memory and "
                    "merged / unmerged inference for each method, interleaved in one process, with ratios to "
                    "stock LoRA; writes bench.json and bench.md to --output.",
    )
    from .bench import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    analyze = commands.add_parser(
        "analyze", help="measure the spectrum of a weight change (full fine-tuning or an adapter)",
        description="For each target matrix's dW (--tuned minus --base, or an adapter's): energy in the top-k DCT / "
                    "DFT coefficients in the original, a random, and S2FT orderings; spectral flatness; error at "
                    "equal parameter budgets against the best low-rank approximation; an adapter's locations against "
                    "the full dW. Writes analysis.md, analysis.json, energy.png and errors.png to --output.",
    )
    from .analyze import add_analyze_arguments

    add_analyze_arguments(analyze)
    analyze.set_defaults(func=_analyze)
    return parser


def _finetune(args) -> int:
    from .finetune import run_finetune

    return run_finetune(args)


def _evaluate(args) -> int:
    from .finetune import run_evaluate

    return run_evaluate(args)


def _compare(args) -> int:
    from .compare import run_compare

    return run_compare(args)


def _bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def _analyze(args) -> int:
    from .analyze import run_analyze

    return run_analyze(args)


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
