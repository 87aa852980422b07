"""The options of every command. Light on purpose: building the parser imports neither torch nor the library, so
``spectral-peft --help`` and ``spectral-peft COMMAND --help`` need neither. The commands in ``spectral_peft.tools``
read the same names and defaults from here."""

from __future__ import annotations

import argparse
import re
from typing import Iterable, Mapping

from .registry import BENCH_VARIANTS, METHOD_LRS, METHOD_NAMES

# how a user's file is read: None takes the usual name ("text", "label", "image") or UTF-8
FILE_FORMAT_DEFAULTS = {"text_column": None, "label_column": None, "image_column": None, "encoding": None}
# finetune's data options (analyze falls back on them where a run.json does not say)
DATA_DEFAULTS = {"task": "bbc-news", "max_length": 128, "batch_size": 16, "seed": 0, "val_fraction": 0.1,
                 "test_fraction": 0.2, **FILE_FORMAT_DEFAULTS}
DEFAULT_N_FREQUENCY = 1000
DEFAULT_RANK = 8
DEFAULT_HEAD_LR = 5e-3
DEFAULT_LOCATION_LR = 0.1
DEFAULT_EPOCHS = 3.0
# S2FTConfig's priors, warm-up optimizers and transforms, which this light module cannot import (torch); a test keeps
# them equal
S2FT_PRIORS = ("gradient", "lora")
S2FT_PRIOR_OPTIMIZERS = ("sgd", "adam")
S2FT_TRANSFORMS = ("dct", "dft")
COMPARE_DEFAULT_METHODS = ("loca", "s2ft", "lora", "fourierft")
# compare's own options (add_compare_arguments' "grid" group); its other options are finetune's, passed to each cell
COMPARE_GRID_OPTIONS = ("methods", "budgets", "ranks", "seeds", "output", "in_process")
# minilm: the offline MiniLM, query and value, 32 x 128 tokens; minilm-short: the same at 16 x 64; llama: a
# Llama-style model 2048 wide (intermediate 5632), all seven projections, 4 x 256 tokens; llama-1024: the same
# 1024 wide (intermediate 2816); linear: one layer (the sweep)
BENCH_SHAPES = ("minilm", "minilm-short", "llama", "llama-1024", "linear")
DEFAULT_LOG_EVERY = "30s"
_LOG_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s?)\s*$")


def flag(dest: str) -> str:
    """The command-line option of an argument's destination (every option here is named so)."""
    return "--" + dest.replace("_", "-")


def option_tokens(values: Mapping, skip: Iterable[str] = ()) -> list[str]:
    """The command line that gives these option values: each option that is set, a flag alone when true."""
    tokens = []
    for dest, value in values.items():
        if dest in skip or value is None or value is False:
            continue
        tokens += [flag(dest)] if value is True else [flag(dest), str(value)]
    return tokens


def log_every(text: str) -> tuple[str, float]:
    """``--log-every``: ``"20"`` (steps) -> ("steps", 20), ``"30s"`` (seconds) -> ("seconds", 30)."""
    match = _LOG_EVERY.match(str(text))
    if match is None or float(match.group(1)) <= 0 or (not match.group(2) and "." in match.group(1)):
        raise ValueError(f"--log-every: expected a number of steps (20) or seconds (30s), got {text!r}")
    return ("seconds", float(match.group(1))) if match.group(2) else ("steps", int(match.group(1)))


def _log_every_type(text: str) -> str:
    try:
        log_every(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).split(": ", 1)[1]) from None
    return text.strip()


def add_training_arguments(parser: argparse.ArgumentParser, grid: bool = False) -> None:
    """The options shared by ``finetune`` and ``compare`` (``grid``: compare's variant, without the method and
    budget options, and with per-method ``--lr`` / ``--scaling``)."""
    _add_data_arguments(parser.add_argument_group("model and data"))
    _add_method_arguments(parser.add_argument_group("method"), grid)
    _add_loop_arguments(parser.add_argument_group("training"))


def _add_data_arguments(what) -> None:
    what.add_argument("--model", default=None,
                      help="local Hugging Face model folder or hub id (loaded offline first); default: the offline "
                           "all-MiniLM-L6-v2")
    what.add_argument("--task", default=DATA_DEFAULTS["task"],
                      help="'bbc-news' (default); a .csv / .jsonl with text (or image path) and label columns "
                           "(classification); a folder of images, one subfolder per class; a .txt (language "
                           "modelling: perplexity); or a datasets hub name")
    add_file_format_arguments(what)
    what.add_argument("--max-length", type=int, default=DATA_DEFAULTS["max_length"],
                      help=f"tokens per example (default {DATA_DEFAULTS['max_length']})")
    what.add_argument("--val-fraction", type=float, default=DATA_DEFAULTS["val_fraction"],
                      help=f"validation share of each label (default {DATA_DEFAULTS['val_fraction']})")
    what.add_argument("--test-fraction", type=float, default=DATA_DEFAULTS["test_fraction"],
                      help=f"test share of each label (default {DATA_DEFAULTS['test_fraction']})")
    what.add_argument("--target-modules", default=None,
                      help="comma list of module names to adapt; default query,value on BERT-like models, "
                           "otherwise PEFT's default for the architecture")


def add_file_format_arguments(what) -> None:
    """How a user's CSV / JSONL / text file is read (finetune, compare and analyze)."""
    what.add_argument("--text-column", default=None,
                      help="CSV / JSONL: the column of the text (default 'text')")
    what.add_argument("--label-column", default=None,
                      help="CSV / JSONL: the column of the label (default 'label')")
    what.add_argument("--image-column", default=None,
                      help="CSV / JSONL of images: the column of the image paths, relative to the file "
                           "(default 'image'; a table with this column and no text column holds images)")
    what.add_argument("--encoding", default=None,
                      help="CSV / JSONL / text file: its character encoding, e.g. latin-1 or cp1252 (default UTF-8)")


def _add_method_arguments(method, grid: bool) -> None:
    if not grid:
        method.add_argument("--method", required=True, metavar="METHOD",
                            help="one of " + ", ".join(METHOD_NAMES) + " (fourierft and lora are stock PEFT)")
        method.add_argument("--n-frequency", type=int, default=DEFAULT_N_FREQUENCY,
                            help=f"spectral coefficients per adapted matrix (default {DEFAULT_N_FREQUENCY})")
        method.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"LoRA rank (default {DEFAULT_RANK})")
    per = "; METHOD=VALUE,... sets it per method" if grid else ""
    method.add_argument("--scaling", default=None, type=str if grid else float,
                        help="multiplier of the weight change; default the method's own (LoCA / S2FT 1, FourierFT "
                             "150, LoRA lora_alpha=8 whatever the rank; for LoRA --scaling s sets lora_alpha = s * "
                             "rank)" + per)
    method.add_argument("--lr", default=None, type=str if grid else float,
                        help="learning rate of the adapter (or of every weight for full); default per method: "
                             + ", ".join(f"{name} {lr:g}" for name, lr in METHOD_LRS.items()) + per)
    method.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                        help=f"learning rate of the classification head (default {DEFAULT_HEAD_LR:g})")
    method.add_argument("--location-lr", type=float, default=DEFAULT_LOCATION_LR,
                        help=f"LoCA: learning rate of locations, in cells per step (default {DEFAULT_LOCATION_LR:g})")
    method.add_argument("--loca-coefficient-steps", type=int, default=10,
                        help="LoCA: coefficient-only steps per cycle, B_a (default 10)")
    method.add_argument("--loca-location-steps", type=int, default=20,
                        help="LoCA: location-only steps per cycle, B_l (default 20)")
    method.add_argument("--location-learning-steps", type=int, default=None,
                        help="LoCA: steps during which locations may move, B_s (default 10%% of the steps but at "
                             "least one full cycle, shrunk to half the run in a short one; 0 freezes the locations)")
    method.add_argument("--s2ft-prior", choices=S2FT_PRIORS, default=None,
                        help="S2FT: prior weight change (default S2FTConfig's: lora, a short LoRA warm-up; gradient "
                             "is cheaper)")
    method.add_argument("--s2ft-prior-optimizer", choices=S2FT_PRIOR_OPTIMIZERS, default=None,
                        help="S2FT: optimizer of the LoRA warm-up prior (default S2FTConfig's: sgd, whose prior "
                             "follows the gradient; adam ordered a real MiniLM change better, docs/s2ft.md)")
    method.add_argument("--prior-batches", type=int, default=8,
                        help="S2FT: training batches for the prior (default 8)")
    method.add_argument("--s2ft-transform", choices=S2FT_TRANSFORMS, default="dct", help="S2FT: transform (default dct)")


def _add_loop_arguments(train) -> None:
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (0: no training, only the base model's metrics)")
    length.add_argument("--epochs", type=float, default=None,
                        help=f"passes over the training split (default {DEFAULT_EPOCHS:g} when --steps is not given)")
    train.add_argument("--batch-size", type=int, default=DATA_DEFAULTS["batch_size"],
                       help=f"examples per forward pass (default {DATA_DEFAULTS['batch_size']})")
    train.add_argument("--grad-accum", type=int, default=1,
                       help="forward passes per optimizer step (default 1)")
    train.add_argument("--warmup-ratio", type=float, default=0.1,
                       help="share of the steps with a linear lr warm-up, then linear decay to 0 (default 0.1)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    train.add_argument("--seed", type=int, default=DATA_DEFAULTS["seed"],
                       help="seed of the split, initialisation and data order")
    train.add_argument("--eval-every", type=int, default=50,
                       help="validate every this many steps (0: only at the end; default 50)")
    train.add_argument("--eval-examples", type=int, default=None,
                       help="validate on the first this many validation examples (default all); test is always whole")
    train.add_argument("--eval-batch-size", type=int, default=32,
                       help="examples per evaluation batch (default 32; a language model takes fewer where their "
                            "logits would pass 128 MB)")
    train.add_argument("--save-every", type=int, default=100,
                       help="write a checkpoint every this many steps (0: never; default 100)")
    train.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint/ when the run finishes")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    train.add_argument("--log-every", type=_log_every_type, default=DEFAULT_LOG_EVERY,
                       help="when the output is not a terminal: a progress line every this many steps (20) or "
                            f"seconds (30s; default {DEFAULT_LOG_EVERY}); a terminal gets progress bars")
    train.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="output folder")
    out.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint in --output (same options as the first run)")
    out.add_argument("--overwrite", action="store_true", help="replace a spectral-peft run already in --output")
    out.add_argument("--stop-after", type=int, default=None,
                     help="stop after this optimizer step, leaving a checkpoint to continue with --resume")
    out.add_argument("--skip-base", action="store_true",
                     help="do not measure the base model on validation and test before training")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="a finetune --output folder")
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="default test")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid")
    grid.add_argument("--methods", nargs="+", default=[",".join(COMPARE_DEFAULT_METHODS)],
                      help="methods, comma or space separated (default " + ",".join(COMPARE_DEFAULT_METHODS)
                           + "; any of " + ", ".join(METHOD_NAMES) + ")")
    grid.add_argument("--budgets", nargs="+", default=["100,300,1000"],
                      help="n_frequency values for the spectral methods (default 100,300,1000)")
    grid.add_argument("--ranks", nargs="+", default=["1,4,8"], help="LoRA ranks (default 1,4,8)")
    grid.add_argument("--seeds", nargs="+", default=["0"], help="seeds (default 0)")
    grid.add_argument("--output", required=True, help="output folder of the grid")
    grid.add_argument("--in-process", action="store_true",
                      help="run the cells in this process (faster start; peak memory is then this process's)")
    add_training_arguments(parser, grid=True)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    variants = list(BENCH_VARIANTS)
    parser.add_argument("--shapes", nargs="+", choices=BENCH_SHAPES, default=["minilm", "llama", "linear"])
    parser.add_argument("--methods", nargs="+", choices=variants, default=variants)
    parser.add_argument("--n-frequency", type=int, default=DEFAULT_N_FREQUENCY)
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"LoRA rank (default {DEFAULT_RANK})")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    # None: cuda where there is one, else cpu (decided when the command runs: torch is not imported here)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="base model dtype (adapter parameters stay float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sweep-widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--sweep-n", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--model", default=None,
                        help="folder of the model for the minilm shape (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--random-weights", action="store_true",
                        help="minilm shape: build the architecture from its config.json only (same timings)")
    parser.add_argument("--output", default=None, help="folder for bench.json and bench.md (and sweep.png)")


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to analyse")
    what.add_argument("--base", default=None,
                      help="the pretrained model: local Hugging Face folder or hub id; default the offline "
                           "all-MiniLM-L6-v2")
    what.add_argument("--tuned", default=None,
                      help="the fully fine-tuned model (folder or hub id; e.g. a finetune --method full output)")
    what.add_argument("--adapter", default=None,
                      help="a PEFT adapter folder (e.g. a finetune output); with --tuned as well, its locations are "
                           "compared with the full fine-tuning dW")
    what.add_argument("--target-modules", default=None,
                      help="with --tuned: comma list of module names (a name or the end of one, as PEFT matches); "
                           "default every Linear weight that changed, the head excluded")
    prior = parser.add_argument_group("gradient prior (S2FT's ordering before training)")
    prior.add_argument("--prior", choices=("auto", "gradient", "none"), default="auto",
                       help="gradient: minus the summed gradient over --prior-batches training batches; none: skip "
                            "it (no data needed); auto (default): gradient when the data is known (--task, the "
                            "run.json of --tuned/--adapter, or the default model's BBC News), else none")
    prior.add_argument("--prior-batches", type=int, default=4, help="batches for the prior (default 4)")
    prior.add_argument("--task", default=None,
                       help="as finetune's --task; default the run.json of --tuned/--adapter, else bbc-news")
    prior.add_argument("--max-length", type=int, default=None, help="as finetune's; default run.json's, else 128")
    prior.add_argument("--batch-size", type=int, default=None, help="as finetune's; default run.json's, else 16")
    prior.add_argument("--seed", type=int, default=None,
                       help="split, head initialisation, batches and the random control; default run.json's, else 0")
    prior.add_argument("--val-fraction", type=float, default=None, help="as finetune's (default run.json's, else 0.1)")
    prior.add_argument("--test-fraction", type=float, default=None,
                       help="as finetune's (default run.json's, else 0.2)")
    add_file_format_arguments(prior)
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True,
                     help="folder for analysis.md, analysis.json, energy.png and errors.png (created; an earlier "
                          "analysis there is replaced)")
    out.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
