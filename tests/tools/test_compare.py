"""`spectral-peft compare`: the grid, the results files, skipping finished cells, per-method options."""

from __future__ import annotations

import json

import pytest

from spectral_peft.tools.compare import aggregate, cell_argv, markdown_table, plan_cells
from spectral_peft.tools.errors import UsageError
from spectral_peft_cli import main
from spectral_peft_cli.checks import parse_per_method

from .cli_support import bad_input, examples, make_tiny_bert, write_csv

FAST = ["--steps", "2", "--batch-size", "8", "--max-length", "16", "--eval-every", "0", "--prior-batches", "1",
        "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {"bert": str(make_tiny_bert(root / "bert")), "csv": str(write_csv(root / "data.csv", examples()))}


def compare(capsys, files, output, *extra):
    code = main(["compare", "--model", files["bert"], "--task", files["csv"], *FAST, "--output", str(output),
                 *[str(e) for e in extra]])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_writes_results_and_skips_finished_cells(capsys, files, tmp_path):
    grid = ["--methods", "loca,s2ft,lora,fourierft", "--budgets", "8,16", "--ranks", "1", "--seeds", "0,1",
            "--lr", "loca=0.02,lora=0.002", "--in-process"]
    code, out, err = compare(capsys, files, tmp_path, *grid)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "cells").iterdir())
    assert names == sorted(
        [f"{m}-n{n}-seed{s}" for m in ("loca", "s2ft", "fourierft") for n in (8, 16) for s in (0, 1)]
        + [f"lora-r1-seed{s}" for s in (0, 1)]
    )
    for name in names:
        assert (tmp_path / "cells" / name / "metrics.json").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "accuracy"
    rows = {(r["method"], r["budget"]): r for r in results["rows"]}
    assert set(rows) == {("loca", "n8"), ("loca", "n16"), ("s2ft", "n8"), ("s2ft", "n16"), ("fourierft", "n8"),
                         ("fourierft", "n16"), ("lora", "r1")}
    for row in rows.values():
        assert row["seeds"] == [0, 1] and len(row["accuracy_values"]) == 2
        assert row["accuracy_std"] is not None and row["trainable_params"] > 0 and row["adapter_bytes"] > 0
    # LoCA and S2FT: 16 coefficients per matrix (4 matrices); LoCA's 2 x 16 float locations are counted apart
    assert rows[("loca", "n16")]["adapter_params"] == rows[("s2ft", "n16")]["adapter_params"] == 64
    assert rows[("loca", "n16")]["location_params"] == 2 * 64 and rows[("s2ft", "n16")]["location_params"] == 0
    assert "| 64 (+128 locations) |" in (tmp_path / "results.md").read_text()
    lrs = {c["method"]: c["lr"] for c in results["cells"]}
    assert lrs["loca"] == 0.02 and lrs["lora"] == 0.002 and lrs["s2ft"] == 0.01  # s2ft: its default
    table = (tmp_path / "results.md").read_text()
    assert "| method | budget | trainable params |" in table and "| loca | n16 |" in table
    assert "±" in table
    assert "| loca | n16 |" in out  # printed
    # the base model before training, measured once per seed (by the seed's first cell), is the table's first row
    assert out.splitlines()[2].startswith("| base model (fresh head) | - | - | - | - | ")
    assert results["base"]["seeds"] == [0, 1] and len(results["base"]["accuracy_values"]) == 2
    measured = {(c["method"], c["budget"], c["seed"]) for c in results["cells"] if c.get("base")}
    assert measured == {("loca", "n8", 0), ("loca", "n8", 1)}
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"

    stamps = {n: (tmp_path / "cells" / n / "metrics.json").stat().st_mtime_ns for n in names}
    code, out, err = compare(capsys, files, tmp_path, *grid)
    assert code == 0, err
    assert err.count("finished before, skipped") == len(names)
    assert {n: (tmp_path / "cells" / n / "metrics.json").stat().st_mtime_ns for n in names} == stamps
    assert "| loca | n16 |" in out


def test_compare_resumes_an_interrupted_cell_and_runs_cells_in_fresh_processes(capsys, files, tmp_path):
    # a cell stopped half way (as by Ctrl-C after a checkpoint) is resumed, here by a subprocess
    cell = tmp_path / "cells" / "lora-r1-seed0"
    code = main(["finetune", "--method", "lora", "--rank", "1", "--model", files["bert"], "--task", files["csv"],
                 *FAST, "--steps", "4", "--stop-after", "2", "--output", str(cell)])
    assert code == 0
    capsys.readouterr()
    code, out, err = compare(capsys, files, tmp_path, "--methods", "lora", "--ranks", "1", "--steps", "4")
    assert code == 0, err
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and len(metrics["loss"]) == 4
    assert "| lora | r1 |" in out


def test_a_failed_cell_is_reported_and_the_others_still_run(capsys, files, tmp_path):
    # n_frequency 5000 does not fit the tiny 32 x 32 matrices: that cell fails, LoRA's runs
    code, out, err = compare(capsys, files, tmp_path, "--methods", "fastfourierft,lora", "--budgets", "5000",
                             "--ranks", "1", "--in-process")
    assert code == 1
    assert "failed cells: fastfourierft-n5000-seed0" in err
    assert not (tmp_path / "cells" / "fastfourierft-n5000-seed0" / "metrics.json").exists()
    assert "| lora | r1 |" in out and "(failed: 0)" in out


def test_parse_per_method():
    assert parse_per_method(None, ["loca"], "lr") == {}
    assert parse_per_method("0.1", ["loca", "lora"], "lr") == {"loca": 0.1, "lora": 0.1}
    assert parse_per_method("loca=0.1, lora=1e-3", ["loca", "lora"], "lr") == {"loca": 0.1, "lora": 0.001}
    with pytest.raises(UsageError, match="unknown method 'lorra'"):
        parse_per_method("lorra=1", ["lora"], "lr")
    with pytest.raises(UsageError, match="not a number"):
        parse_per_method("loca=fast", ["loca"], "lr")


def test_plan_and_cell_arguments():
    cells = plan_cells(["loca", "lora", "full"], [100, 300], [4], [0, 1])
    assert [c["name"] for c in cells] == [
        "loca-n100-seed0", "loca-n300-seed0", "lora-r4-seed0", "full-all-seed0",
        "loca-n100-seed1", "loca-n300-seed1", "lora-r4-seed1", "full-all-seed1",
    ]
    import argparse

    namespace = argparse.Namespace(method="loca", n_frequency=300, lr=0.01, quiet=True, output="x", steps=5,
                                   model=None, task="bbc-news")
    argv = cell_argv(namespace)
    assert argv[:1] == ["finetune"] and argv[-3:] == ["--output", "x", "--resume"]
    assert "--quiet" in argv and argv[argv.index("--n-frequency") + 1] == "300" and "--model" not in argv


def test_table_for_one_seed_has_no_std():
    cells = [{"method": "lora", "budget": "r4", "seed": 0, "status": "finished", "test": {"accuracy": 0.5,
              "macro_f1": 0.4}, "trainable_params": 10, "adapter_params": 8, "adapter_bytes": 100,
              "time_per_step_s": 0.25, "peak_memory_mib": 300.0}]
    table = markdown_table(aggregate(cells, "accuracy"), "accuracy")
    assert "| lora | r4 | 10 | 8 | 100 | 0.5000 | 0.4000 | 0.250 | 300 | 0 |" in table


def test_a_cell_finished_with_other_options_is_left_out(capsys, files, tmp_path):
    code, _, err = compare(capsys, files, tmp_path, "--methods", "lora", "--ranks", "1", "--in-process")
    assert code == 0, err
    code, out, err = compare(capsys, files, tmp_path, "--methods", "lora", "--ranks", "1", "--in-process",
                             "--steps", "3")
    assert code == 1
    assert "finished before with other options (--steps 2, now 3)" in err
    assert "(failed: 0)" in out


def test_compare_with_an_unknown_method(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "grid"
    bad_input(capsys, ["compare", "--methods", "loca,nope", "--model", bert, "--task", good_csv, "--output", out],
              out, "unknown method 'nope'")


def test_a_cells_command_line_gives_finetune_the_cells_options(tmp_path):
    """Built from the cell's own options, the command line parses back to them (so a subprocess cell trains what
    an in-process one does)."""
    import argparse

    from spectral_peft.tools.compare import cell_namespace
    from spectral_peft_cli import build_parser

    compare_args = build_parser().parse_args(["compare", "--output", str(tmp_path), "--steps", "7", "--quiet",
                                              "--target-modules", "query", "--eval-every", "0"])
    cells = plan_cells(["loca", "lora"], [300], [4], [1])
    for cell in cells:
        namespace = cell_namespace(compare_args, cell, {"loca": 0.02}, {}, tmp_path / cell["name"])
        parsed = build_parser().parse_args(cell_argv(namespace))
        expected = {k: v for k, v in vars(namespace).items()}
        got = {k: v for k, v in vars(parsed).items() if k not in ("func", "command")}
        assert got == expected, cell["name"]
    assert isinstance(namespace, argparse.Namespace) and namespace.rank == 4 and namespace.seed == 1


def test_an_interrupted_compare_says_so_once(capsys, files, tmp_path, monkeypatch):
    from spectral_peft.tools import compare as compare_module

    monkeypatch.setattr(compare_module, "_run_cell", lambda namespace, in_process: 130)  # a cell's Ctrl-C
    code, _, err = compare(capsys, files, tmp_path, "--methods", "lora", "--ranks", "1")
    assert code == 130
    told = [line for line in err.splitlines() if line.startswith("spectral-peft: interrupted")]
    assert len(told) == 1 and "rerun the same compare command to continue" in told[0]


def test_a_cells_process_leaves_its_interruption_to_compare(capsys, tmp_path, monkeypatch):
    """A Ctrl-C reaches compare and its cell's process alike: the cell (run with CELL_ENV set) says nothing."""
    from spectral_peft.tools import finetune
    from spectral_peft_cli.commands import CELL_ENV

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "run_finetune", interrupted)
    argv = ["finetune", "--method", "lora", "--output", str(tmp_path / "cell")]
    assert main(argv) == 130 and capsys.readouterr().err.startswith("spectral-peft: interrupted; rerun the same")
    monkeypatch.setenv(CELL_ENV, "1")
    assert main(argv) == 130 and capsys.readouterr().err == ""
