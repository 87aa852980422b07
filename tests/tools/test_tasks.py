"""Tasks read for finetune: a CSV / JSONL / text file that cannot be used gives one line on stderr, exit code 2,
no traceback and no output folder."""

from __future__ import annotations

import json

import pytest

from .cli_support import bad_input, examples, finetune_argv, write_csv, write_jsonl


def test_missing_task_file(capsys, bert, tmp_path):
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, tmp_path / "nope.csv", out), out, "task file not found")


def test_csv_without_the_label_column(capsys, bert, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "a cat", "topic": "x"}], columns=("text", "topic"))
    out = tmp_path / "out"
    line = bad_input(capsys, finetune_argv(bert, path, out), out, "no 'label' column")
    assert "found: text, topic" in line


def test_csv_with_float_labels(capsys, bert, tmp_path):
    rows = [{"text": r["text"], "label": 0.5 if i == 3 else i % 2} for i, r in enumerate(examples(per_label=4))]
    path = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out), out, "line 5 has the label '0.5', a non-integer number")


def test_csv_with_a_missing_label(capsys, bert, tmp_path):
    rows = [{"text": r["text"], "label": "" if i == 0 else r["label"]} for i, r in enumerate(examples(per_label=4))]
    path = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out), out, "line 2 has an empty label")


@pytest.mark.parametrize("label, described", [(None, "null"), (1.5, "a non-integer number"), ([1], "a list"),
                                              (True, "a boolean")])
def test_jsonl_labels_that_are_neither_integers_nor_strings(capsys, bert, tmp_path, label, described):
    rows = [{"text": r["text"], "label": r["label"]} for r in examples(per_label=4)]
    rows[2]["label"] = label
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out), out, f"line 3 has the label {json.dumps(label)} ({described})")


def test_jsonl_mixing_integer_and_string_labels(capsys, bert, tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out), out, "mix integers and strings")


def test_an_empty_split(capsys, bert, tmp_path):
    # 2 examples per label: round(0.1 * 2) = 0 validation examples
    path = write_csv(tmp_path / "d.csv", examples(per_label=2))
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out), out, "the validation split is empty")


def test_a_single_label(capsys, bert, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "cat dog", "label": "animals"}] * 10)
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out), out, "at least 2 labels")
