"""Progress a user can read anywhere: bars on a terminal; in a log (stderr a file or a pipe) a line every N steps or
T seconds with the count, the loss, the rate and the time left, for training, evaluation and S2FT's preparation."""

from __future__ import annotations

import re

import pytest

from spectral_peft.tools import progress
from spectral_peft_cli import main

from .cli_support import finetune_argv

LINE = re.compile(r"^lora training: step (\d+)/4, loss \d+\.\d{4}, lr [\d.e+-]+, [\d.]+ (steps/s|s/step)"
                  r"(, \S+ left|, \S+ in all)$")


@pytest.fixture(autouse=True)
def _log_settings():
    yield
    progress.configure()  # the defaults again: a log (or terminal) decides, a line every 30 s


def lines_of(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


def test_a_log_gets_a_line_every_n_steps_with_the_loss_rate_and_time_left(capsys):
    progress.configure("2", terminal=False)
    with progress.Progress(5, "run") as bar:
        for step in range(5):
            bar.update(1, loss=f"{step:.4f}")
    lines = lines_of(capsys.readouterr().err, "run:")
    # the first step (it started, at what speed), every second step, the last
    assert [line.split(",")[0] for line in lines] == ["run: step 1/5", "run: step 2/5", "run: step 4/5",
                                                      "run: step 5/5"]
    assert lines[1].startswith("run: step 2/5, loss 1.0000, ") and lines[1].endswith(" left")
    assert lines[-1].endswith(" in all")


def test_a_log_gets_a_line_every_t_seconds(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    progress.configure("25s", terminal=False)
    bar = progress.Progress(8, "run")
    for _ in range(8):  # one step every 10 s
        now[0] += 10.0
        bar.update(1)
    lines = lines_of(capsys.readouterr().err, "run:")
    assert [line.split(",")[0] for line in lines] == ["run: step 1/8", "run: step 4/8", "run: step 7/8",
                                                      "run: step 8/8"]
    assert "0.10 steps/s" in lines[1] and "40s left" in lines[1]


def test_a_short_pass_says_nothing_a_long_one_says_how_far_it_is(capsys):
    progress.configure("3", terminal=False)
    with progress.Progress(2, "validation", unit="batch", leave=False) as short:
        short.update(2)
    with progress.Progress(7, "test", unit="batch", leave=False) as long:
        for _ in range(7):
            long.update(1)
    err = capsys.readouterr().err
    assert lines_of(err, "validation") == []
    assert [line.split(",")[0] for line in lines_of(err, "test:")] == ["test: batch 3/7", "test: batch 6/7",
                                                                       "test: batch 7/7"]
    assert "batches/s" in lines_of(err, "test:")[0]


def test_a_terminal_gets_a_bar_and_quiet_gets_nothing(capsys):
    progress.configure(terminal=True)
    with progress.Progress(3, "run") as bar:
        assert bar.bar is not None
        bar.update(3)
    assert "run: 100%" in capsys.readouterr().err
    progress.configure("1", quiet=True, terminal=False)
    with progress.Progress(3, "run") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_a_finetune_run_in_a_log_shows_its_progress(capsys, bert, good_csv, tmp_path):
    argv = [a for a in finetune_argv(bert, good_csv, tmp_path / "out") if a != "--quiet"]
    argv[argv.index("--steps") + 1] = "4"
    assert main([str(a) for a in argv + ["--log-every", "1"]]) == 0
    lines = lines_of(capsys.readouterr().err, "lora training:")
    assert [int(LINE.match(line).group(1)) for line in lines] == [1, 2, 3, 4], lines


def test_s2fts_preparation_reports_in_a_log_and_the_core_is_left_as_it_was(capsys, bert, good_csv, tmp_path):
    import spectral_peft.s2ft.prepare as prepare

    original = prepare.tqdm
    argv = [a for a in finetune_argv(bert, good_csv, tmp_path / "out") if a != "--quiet"]
    argv[argv.index("lora")] = "s2ft"
    assert main([str(a) for a in argv + ["--log-every", "2", "--prior-batches", "1"]]) == 0
    err = capsys.readouterr().err
    assert lines_of(err, "S2FT LoRA prior: step 10/"), err
    assert lines_of(err, "S2FT orderings: matrix 4/4"), err
    assert prepare.tqdm is original


def test_log_every_is_checked_when_parsed(capsys, bert, good_csv, tmp_path):
    from .cli_support import bad_input

    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, good_csv, out, "--log-every", "soon"), out,
              "argument --log-every: expected a number of steps (20) or seconds (30s), got 'soon'")
