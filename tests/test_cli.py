"""The command line: entry points, and bad input (one line on stderr, exit code 2, no traceback, nothing left
looking finished)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from spectral_peft.cli import main

from .cli_support import examples, make_tiny_bert, write_csv, write_jsonl

FAST = ["--steps", "2", "--batch-size", "8", "--max-length", "16", "--n-frequency", "8", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(make_tiny_bert(tmp_path_factory.mktemp("cli") / "bert"))


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory):
    return str(write_csv(tmp_path_factory.mktemp("cli") / "data.csv", examples(per_label=10)))


def bad_input(capsys, argv, output: pathlib.Path, message: str) -> str:
    """Runs the command; checks exit code 2, one error line naming the problem, no traceback, no output folder."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("spectral-peft: error:")]
    assert len(errors) == 1, err
    assert message in errors[0], errors[0]
    assert not output.exists(), "validation must come before anything is created"
    return errors[0]


def finetune(model, task, output, *extra):
    return ["finetune", "--method", "lora", "--model", model, "--task", task, *FAST, "--output", output, *extra]


def test_missing_task_file(capsys, bert, tmp_path):
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, tmp_path / "nope.csv", out), out, "task file not found")


def test_csv_without_the_label_column(capsys, bert, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "a cat", "topic": "x"}], columns=("text", "topic"))
    out = tmp_path / "out"
    line = bad_input(capsys, finetune(bert, path, out), out, "no 'label' column")
    assert "found: text, topic" in line


def test_csv_with_float_labels(capsys, bert, tmp_path):
    rows = [{"text": r["text"], "label": 0.5 if i == 3 else i % 2} for i, r in enumerate(examples(per_label=4))]
    path = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, path, out), out, "line 5 has the label '0.5', a non-integer number")


def test_csv_with_a_missing_label(capsys, bert, tmp_path):
    rows = [{"text": r["text"], "label": "" if i == 0 else r["label"]} for i, r in enumerate(examples(per_label=4))]
    path = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, path, out), out, "line 2 has an empty label")


@pytest.mark.parametrize("label, described", [(None, "null"), (1.5, "a non-integer number"), ([1], "a list"),
                                              (True, "a boolean")])
def test_jsonl_labels_that_are_neither_integers_nor_strings(capsys, bert, tmp_path, label, described):
    rows = [{"text": r["text"], "label": r["label"]} for r in examples(per_label=4)]
    rows[2]["label"] = label
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, path, out), out, f"line 3 has the label {json.dumps(label)} ({described})")


def test_jsonl_mixing_integer_and_string_labels(capsys, bert, tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, path, out), out, "mix integers and strings")


def test_an_empty_split(capsys, bert, tmp_path):
    # 2 examples per label: round(0.1 * 2) = 0 validation examples
    path = write_csv(tmp_path / "d.csv", examples(per_label=2))
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, path, out), out, "the validation split is empty")


def test_a_single_label(capsys, bert, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "cat dog", "label": "animals"}] * 10)
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, path, out), out, "at least 2 labels")


def test_unknown_method(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "out"
    argv = finetune(bert, good_csv, out)
    argv[argv.index("lora")] = "dora"
    bad_input(capsys, argv, out, "unknown method 'dora'; choose one of loca, s2ft, fourierft")


def test_unknown_model_folder(capsys, good_csv, tmp_path):
    out = tmp_path / "out"
    bad_input(capsys, finetune(tmp_path / "no-such-model", good_csv, out), out, "model folder not found")


def test_unknown_hub_model_offline(capsys, good_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    bad_input(capsys, finetune("nobody-has/this-model-xyz", good_csv, out), out,
              "unknown model 'nobody-has/this-model-xyz': not a local folder and not in the Hugging Face cache")


def test_a_folder_that_is_not_a_model(capsys, good_csv, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    bad_input(capsys, finetune(tmp_path / "empty", good_csv, out), out, "has no config.json")


def test_a_model_folder_with_broken_weights(capsys, bert, good_csv, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(bert):
        (broken / name).write_bytes(pathlib.Path(bert, name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    bad_input(capsys, finetune(broken, good_csv, out), out, "could not load model")


def test_a_text_file_with_an_encoder_model(capsys, bert, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("cat dog " * 200)
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, path, out), out, "is an encoder (bert)")


def test_a_budget_larger_than_the_matrix(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "out"
    argv = finetune(bert, good_csv, out)
    argv[argv.index("lora")] = "loca"
    argv[argv.index("--n-frequency") + 1] = "5000"  # the tiny model's query is 32 x 32
    bad_input(capsys, argv, out, "n_frequency=5000 is larger than its 32 x 32")


def test_unknown_option_and_missing_output(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "out"
    bad_input(capsys, finetune(bert, good_csv, out, "--learning-rate", "1"), out, "unrecognized arguments")
    argv = finetune(bert, good_csv, out)[:-2]
    bad_input(capsys, argv, out, "the following arguments are required: --output")
    bad_input(capsys, finetune(bert, good_csv, out, "--batch-size", "0"), out, "--batch-size must be positive")


def test_evaluate_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    bad_input(capsys, ["evaluate", "--adapter", tmp_path / "missing"], tmp_path / "missing", "adapter folder not found")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    code = main(["evaluate", "--adapter", str(tmp_path / "half")])
    assert code == 2 and "did not finish" in capsys.readouterr().err


def test_compare_with_an_unknown_method(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "grid"
    bad_input(capsys, ["compare", "--methods", "loca,nope", "--model", bert, "--task", good_csv, "--output", out],
              out, "unknown method 'nope'")


def test_console_script_and_module_entry_points():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "spectral_peft", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0 and "finetune" in result.stdout and "compare" in result.stdout
    script = pathlib.Path(sys.executable).parent / "spectral-peft"
    if script.exists():  # installed with pip install -e / make install
        result = subprocess.run([str(script), "finetune", "--method", "x"], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("spectral-peft: error:")
        assert "Traceback" not in result.stderr
