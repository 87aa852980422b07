"""Tasks read for finetune: a CSV / JSONL / text file that cannot be used gives one error on stderr (every problem
found, one line each), exit code 2, no traceback and no output folder; a user's file is read with the columns and
the encoding it has."""

from __future__ import annotations

import json

import pytest

from spectral_peft.tools.errors import UsageError

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


# ---------------------------------------------------------------------------------------------------------------
# a user's file as it is: other column names, another encoding; every problem in one error


def _tweets(path, rows, encoding="utf-8"):
    """A CSV as a user may have it: columns id, sentiment, tweet; accented words."""
    lines = ["id,sentiment,tweet"] + [f"{i},{r['label']},{r['text']} café" for i, r in enumerate(rows)]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def test_a_latin1_csv_with_other_columns_tells_every_problem_and_its_flag(capsys, bert, tmp_path):
    path = _tweets(tmp_path / "tweets.csv", examples(per_label=10), encoding="latin-1")
    out = tmp_path / "out"
    error = bad_input(capsys, finetune_argv(bert, path, out), out, "3 problems:")
    assert "not UTF-8 text (invalid continuation byte at byte " in error and "--encoding latin-1" in error
    assert "no 'label' column (found: id, sentiment, tweet); name the label column with --label-column" in error
    assert "no 'text' column (found: id, sentiment, tweet); name the text column with --text-column" in error


def test_a_latin1_csv_with_other_columns_trains_with_the_flags_and_evaluates(capsys, bert, tmp_path):
    from spectral_peft_cli import main

    path = _tweets(tmp_path / "tweets.csv", examples(per_label=10), encoding="latin-1")
    out = tmp_path / "out"
    argv = finetune_argv(bert, path, out, "--text-column", "tweet", "--label-column", "sentiment",
                         "--encoding", "latin-1")
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    capsys.readouterr()
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["text_column"], settings["label_column"], settings["encoding"]) == ("tweet", "sentiment",
                                                                                          "latin-1")
    assert json.loads((out / "run.json").read_text())["label_names"] == ["animals", "colors", "numbers"]
    assert main(["evaluate", "--adapter", str(out), "--threads", "1"]) == 0  # read again with the run's encoding
    assert " NO" not in capsys.readouterr().out


def test_the_texts_are_read_in_the_encoding_given(bert, tmp_path):
    from spectral_peft.tools.tasks import load_task

    path = _tweets(tmp_path / "tweets.csv", examples(per_label=10), encoding="cp1252")
    formats = {"text_column": "tweet", "label_column": "sentiment", "encoding": "cp1252"}
    task = load_task(str(path), formats=formats)
    assert all(row["text"].endswith(" café") for split in task.splits.values() for row in split)


def test_jsonl_with_other_field_names(capsys, bert, tmp_path):
    from spectral_peft.tools.tasks import load_task

    rows = [{"body": r["text"], "topic": r["label"]} for r in examples(per_label=10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    bad_input(capsys, finetune_argv(bert, path, out, "--label-column", "topic"), out,
              "no 'text' column (found: body, topic); name the text column with --text-column")
    task = load_task(str(path), formats={"text_column": "body", "label_column": "topic"})
    assert task.label_names == ["animals", "colors", "numbers"] and sum(map(len, task.splits.values())) == 30


def test_an_unknown_encoding_and_a_misnamed_column(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "out"
    error = bad_input(capsys, finetune_argv(bert, good_csv, out, "--encoding", "latin-9x"), out,
                      "--encoding: unknown encoding 'latin-9x'")
    assert "problems" not in error
    bad_input(capsys, finetune_argv(bert, good_csv, out, "--text-column", "tweet"), out,
              "no 'tweet' column (found: text, label), given with --text-column")


def test_every_bad_row_is_told_in_one_error(capsys, bert, tmp_path):
    rows = [{"text": r["text"], "label": r["label"]} for r in examples(per_label=4)]
    rows[1]["label"], rows[5]["label"] = "", "2.5"
    path = write_csv(tmp_path / "d.csv", rows)
    out = tmp_path / "out"
    error = bad_input(capsys, finetune_argv(bert, path, out), out, "2 problems:")
    assert "line 3 has an empty label" in error and "line 7 has the label '2.5', a non-integer number" in error


def test_a_latin1_text_file_for_language_modelling(capsys, tmp_path):
    from spectral_peft.tools.tasks import load_task

    path = tmp_path / "corpus.txt"
    path.write_bytes("le café est très bon\n".encode("latin-1") * 50)
    with pytest.raises(UsageError, match=r"line 1\); give the file's encoding with --encoding"):
        load_task(str(path))
    assert load_task(str(path), formats={"encoding": "latin-1"}).text.startswith("le café")


def test_a_text_file_that_does_not_decode_is_told_as_the_command_lines_check_tells_it(tmp_path):
    from spectral_peft.tools.tasks import load_task
    from spectral_peft_cli.inputs import check_decodes

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"plain line\nanother one\nthen caf\xe9 au lait\n" * 3)
    with pytest.raises(UsageError) as from_check:
        check_decodes(path, None)
    with pytest.raises(UsageError) as from_load:
        load_task(str(path))
    assert str(from_load.value) == str(from_check.value)
    assert "byte 31, line 3" in str(from_load.value)
