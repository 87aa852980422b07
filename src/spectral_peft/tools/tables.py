"""A user's CSV / JSONL classification file, read whole: every row's value (a text, or an image path relative to the
file) and label, with every bad row reported in one error.

Which columns hold what (``--text-column``, ``--label-column``, ``--image-column``) and the encoding
(``--encoding``) follow the command line's rules (``spectral_peft_cli.inputs``), which checked the header first.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re

from spectral_peft_cli.inputs import IMAGE, Table, decoding_problem, encoding_of, table_columns, table_layout

from .errors import Problems, UsageError

_INT = re.compile(r"^[+-]?\d+$")


def read_table(path: pathlib.Path, file_format) -> tuple[str, list[dict]]:
    """What a CSV or JSONL file holds (``inputs.TEXT`` or ``inputs.IMAGE``) and its rows ``{"value", "label",
    "split", "where"}`` (image paths resolved); ``file_format``: an object with the ``text_column``,
    ``label_column``, ``image_column`` and ``encoding`` attributes."""
    encoding = getattr(file_format, "encoding", None)
    columns = table_columns(path, encoding)
    if not columns:
        raise UsageError(f"{path}: the file has no examples")
    layout = table_layout(path, columns, file_format)
    problems = Problems()
    try:
        rows = (_csv_rows if path.suffix.lower() == ".csv" else _jsonl_rows)(path, layout, encoding_of(encoding),
                                                                               problems)
    except UnicodeDecodeError as error:
        raise UsageError(decoding_problem(path, error, encoding)) from None
    except csv.Error as error:
        raise UsageError(f"{path}: not a valid CSV file ({error})") from None
    if not rows and not problems:
        problems.add(f"{path}: the file has no examples")
    if len({type(row["label"]) for row in rows}) > 1:
        problems.add(f"{path}: the labels mix integers and strings; use one or the other")
    if layout.kind == IMAGE:
        for row in rows:
            row["value"] = _image_path(path, row, problems)
    problems.check()
    return layout.kind, rows


def _csv_rows(path: pathlib.Path, layout: Table, encoding: str, problems: Problems) -> list[dict]:
    rows = []
    with open(path, newline="", encoding=encoding) as f:
        reader = csv.DictReader(f)
        for number, row in enumerate(reader, start=2):
            if None in row:
                problems.add(f"{path}: line {number} has more fields than the header")
                continue
            value, label = row.get(layout.value), row.get(layout.label)
            if value is None or label is None:
                problems.add(f"{path}: line {number} has fewer fields than the header")
                continue
            label = _csv_label(path, number, label, problems)
            if label is not None:
                rows.append({"value": value, "label": label, "split": row.get(layout.split),
                             "where": f"line {number}"})
    return rows


def _csv_label(path: pathlib.Path, number: int, value: str, problems: Problems):
    value = value.strip()
    if not value:
        problems.add(f"{path}: line {number} has an empty label; labels must be integers or strings")
        return None
    if _INT.match(value):
        return int(value)
    try:
        float(value)
    except ValueError:
        return value
    problems.add(f"{path}: line {number} has the label {value!r}, a non-integer number; labels must be integers "
                 "or strings")
    return None


def _jsonl_rows(path: pathlib.Path, layout: Table, encoding: str, problems: Problems) -> list[dict]:
    rows = []
    with open(path, encoding=encoding) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.add(f"{path}: line {number} is not valid JSON ({error.msg})")
                continue
            if not isinstance(record, dict):
                problems.add(f"{path}: line {number} is not a JSON object")
                continue
            row = _jsonl_row(path, number, record, layout, problems)
            if row is not None:
                rows.append(row)
    return rows


def _jsonl_row(path: pathlib.Path, number: int, record: dict, layout: Table, problems: Problems):
    missing = [key for key in (layout.value, layout.label) if key not in record]
    if missing:
        problems.add(f"{path}: line {number} has no '{missing[0]}' field")
        return None
    value, label = record[layout.value], record[layout.label]
    ok = True
    if not isinstance(value, str):
        problems.add(f"{path}: line {number} has a {layout.kind} that is {_describe(value)}, not a string")
        ok = False
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        problems.add(f"{path}: line {number} has the label {json.dumps(label)} ({_describe(label)}); labels must "
                     "be integers or strings")
        ok = False
    elif isinstance(label, str) and not label.strip():
        problems.add(f"{path}: line {number} has an empty label; labels must be integers or strings")
        ok = False
    split = record.get(layout.split)
    return {"value": value, "label": label, "split": split if isinstance(split, str) else None,
            "where": f"line {number}"} if ok else None


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a non-integer number"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    return f"a {type(value).__name__}"


def _image_path(table: pathlib.Path, row: dict, problems: Problems) -> str:
    """An image path of a table, relative to the table's folder (or absolute); a missing file is one problem."""
    path = (table.parent / pathlib.Path(row["value"]).expanduser()).resolve()
    if not path.is_file():
        problems.add(f"{table}: {row['where']}: image file not found: {row['value']}")
    return str(path)
