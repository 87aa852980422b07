"""The command line: the entry points, what its front end imports (nothing heavy for help and bad input), and usage
errors (one error on stderr listing every problem found, exit code 2, no traceback, nothing left looking finished)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from spectral_peft_cli.registry import METHOD_NAMES

from .cli_support import bad_input, finetune_argv


def test_unknown_option_and_missing_output(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, good_csv, out, "--learning-rate", "1"), out, "unrecognized arguments")
    argv = finetune_argv(bert, good_csv, out)[:-2]
    bad_input(capsys, argv, out, "the following arguments are required: --output")
    bad_input(capsys, finetune_argv(bert, good_csv, out, "--batch-size", "0"), out, "--batch-size must be positive")


def test_every_problem_of_the_input_in_one_error(capsys, tmp_path):
    out = tmp_path / "out"
    error = bad_input(capsys, ["finetune", "--method", "dora", "--batch-size", "0", "--task", tmp_path / "nope.csv",
                               "--model", tmp_path / "no-model", "--output", out], out, "4 problems:")
    assert error.splitlines()[1:] == [
        "  - --batch-size must be positive, got 0",
        "  - unknown method 'dora'; choose one of " + ", ".join(METHOD_NAMES),
        f"  - task file not found: {tmp_path / 'nope.csv'}",
        f"  - model folder not found: {tmp_path / 'no-model'}",
    ]


def test_console_script_and_module_entry_points():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for module in ("spectral_peft", "spectral_peft_cli"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0 and "finetune" in result.stdout and "compare" in result.stdout
    script = pathlib.Path(sys.executable).parent / "spectral-peft"
    if script.exists():  # installed with pip install -e / make install
        result = subprocess.run([str(script), "finetune", "--method", "x"], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("spectral-peft: error:")
        assert "Traceback" not in result.stderr


# what the front end loads for help and for bad input: nothing of torch, transformers, PEFT or the library
LIGHT = r"""
import sys
from spectral_peft_cli import build_parser, main
parser = build_parser()
for argv in (["--help"], ["finetune", "--help"], ["evaluate", "--help"], ["compare", "--help"], ["bench", "--help"],
             ["analyze", "--help"]):
    try:
        parser.parse_args(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
bad = [["finetune", "--method", "nonsense", "--output", "x"], ["finetune", "--method", "lora", "--task", "nope.csv",
       "--output", "x"], ["compare", "--methods", "loca,nope", "--output", "x"], ["evaluate", "--adapter", "nope"],
       ["analyze", "--adapter", "nope", "--output", "x"], ["finetune", "--method", "lora", "--task", TASK,
       "--output", "x"]]
for argv in bad:
    assert main(argv) == 2, argv
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "transformers", "peft", "numpy",
               "spectral_peft", "PIL"))
print("heavy:", heavy)
"""


def test_help_and_bad_input_load_neither_torch_nor_the_library(tmp_path):
    table = tmp_path / "tweets.csv"
    table.write_text("id,sentiment,tweet\n1,positive,good\n")  # the wrong columns: a problem found by the front end
    code = LIGHT.replace("TASK", repr(str(table)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--n-frequency" in result.stdout and "--sweep-widths" in result.stdout  # the commands' help was printed
    assert "no 'text' column" in result.stderr and "unknown method 'nope'" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy: []"


def test_version(capsys):
    from spectral_peft import __version__
    from spectral_peft_cli import main

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"spectral-peft {__version__}\n"


def test_the_front_ends_s2ft_choices_are_the_librarys():
    from spectral_peft.s2ft.config import PRIOR_OPTIMIZERS, PRIORS
    from spectral_peft.spectral import TRANSFORMS
    from spectral_peft_cli import arguments

    assert arguments.S2FT_PRIORS == PRIORS and arguments.S2FT_PRIOR_OPTIMIZERS == PRIOR_OPTIMIZERS
    assert arguments.S2FT_TRANSFORMS == tuple(TRANSFORMS)
