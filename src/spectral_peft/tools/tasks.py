"""Tasks for ``spectral-peft finetune``: BBC News, a local CSV / JSONL (classification), a text file (language
modelling) or a ``datasets`` hub name.

Every loader checks its input and raises :class:`~spectral_peft.tools.errors.UsageError` with one line naming the
problem (a missing file, missing columns, labels that are neither integers nor strings, an empty split), before
anything is trained or written.

Splits of a CSV / JSONL without a ``split`` column follow :func:`spectral_peft.tools.data.load_bbc_news`: stratified
by label, fixed by the seed (for each label in order its examples, in file order, are shuffled with one
``random.Random(seed)``; the first ``round(test_fraction * count)`` go to test, the next
``round(validation_fraction * count)`` to validation, the rest to train; each split is then shuffled).
"""

from __future__ import annotations

import csv
import json
import pathlib
import random
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from .data import BBC_NEWS_LABELS, load_bbc_news, stratified_split, tokenize_classification
from .errors import UsageError, first_line

CLASSIFICATION, LANGUAGE_MODELING = "classification", "language-modeling"
SPLITS = ("train", "validation", "test")
BBC_NEWS = "bbc-news"
TABLE_SUFFIXES = (".csv", ".jsonl")
TEXT_SUFFIXES = (".txt",)
# a split column may name the validation split in any of these ways
_SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test"}
_INT = re.compile(r"^[+-]?\d+$")


@dataclass
class Task:
    """What :func:`load_task` read.

    ``kind`` is :data:`CLASSIFICATION` (``splits`` hold ``{"text", "label"}`` dicts, labels are indexes into
    ``label_names``) or :data:`LANGUAGE_MODELING` (``text`` is the whole corpus, split into blocks once a tokenizer
    is known, by :func:`encode_task`).
    """

    name: str
    kind: str
    splits: dict = field(default_factory=dict)
    label_names: Optional[list] = None
    text: Optional[str] = None

    @property
    def num_labels(self) -> Optional[int]:
        return len(self.label_names) if self.label_names is not None else None


def looks_like_path(name: str) -> bool:
    return (
        pathlib.Path(name).suffix.lower() in TABLE_SUFFIXES + TEXT_SUFFIXES
        or name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def load_task(name: str, seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.2) -> Task:
    """Read a task by name: ``bbc-news``, a ``.csv`` / ``.jsonl`` / ``.txt`` file, or a ``datasets`` hub name."""
    for what, value in (("validation fraction", validation_fraction), ("test fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise UsageError(f"the {what} must be between 0 and 1 (exclusive), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise UsageError(
            f"the validation and test fractions add up to {validation_fraction + test_fraction:g}; "
            "they must leave something to train on (sum below 1)"
        )
    if name == BBC_NEWS:
        return _load_bbc_news(seed, validation_fraction, test_fraction)
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            raise UsageError(f"task '{name}' is a folder; expected a .csv, .jsonl or .txt file (or 'bbc-news')")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            rows = _read_csv(path)
        elif suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix in TEXT_SUFFIXES:
            return _read_text_task(path.resolve())
        else:
            raise UsageError(
                f"task file '{name}' has an unknown type '{suffix or '(no suffix)'}'; expected .csv or .jsonl "
                "(columns text, label) or .txt (language modelling)"
            )
        return _classification_task(str(path.resolve()), rows, seed, validation_fraction, test_fraction)
    if looks_like_path(name):
        raise UsageError(f"task file not found: {name}")
    return _load_hub_dataset(name, seed, validation_fraction, test_fraction)


# ---------------------------------------------------------------------------------------------------------------
# BBC News


def _load_bbc_news(seed: int, validation_fraction: float, test_fraction: float) -> Task:
    try:
        splits = load_bbc_news(seed, validation_fraction=validation_fraction, test_fraction=test_fraction)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    return Task(name=BBC_NEWS, kind=CLASSIFICATION, splits=splits, label_names=list(BBC_NEWS_LABELS))


# ---------------------------------------------------------------------------------------------------------------
# CSV / JSONL


def _read_csv(path: pathlib.Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            _check_columns(path, columns)
            rows = []
            for number, row in enumerate(reader, start=2):
                if None in row:
                    raise UsageError(f"{path}: line {number} has more fields than the header")
                text, label = row.get("text"), row.get("label")
                if text is None or label is None:
                    raise UsageError(f"{path}: line {number} has fewer fields than the header")
                rows.append({"text": text, "label": _csv_label(path, number, label), "split": row.get("split"),
                             "where": f"line {number}"})
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise UsageError(f"{path}: not a valid CSV file ({error})") from None
    return rows


def _csv_label(path: pathlib.Path, number: int, value: str):
    value = value.strip()
    if not value:
        raise UsageError(f"{path}: line {number} has an empty label; labels must be integers or strings")
    if _INT.match(value):
        return int(value)
    try:
        float(value)
    except ValueError:
        return value
    raise UsageError(
        f"{path}: line {number} has the label {value!r}, a non-integer number; labels must be integers or strings"
    )


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    rows = []
    columns_checked = False
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise UsageError(f"{path}: line {number} is not a JSON object")
                if not columns_checked:
                    _check_columns(path, list(record))
                    columns_checked = True
                for key in ("text", "label"):
                    if key not in record:
                        raise UsageError(f"{path}: line {number} has no '{key}' field")
                text, label = record["text"], record["label"]
                if not isinstance(text, str):
                    raise UsageError(f"{path}: line {number} has a text that is {_describe(text)}, not a string")
                if isinstance(label, bool) or not isinstance(label, (int, str)):
                    raise UsageError(
                        f"{path}: line {number} has the label {json.dumps(label)} ({_describe(label)}); "
                        "labels must be integers or strings"
                    )
                if isinstance(label, str) and not label.strip():
                    raise UsageError(f"{path}: line {number} has an empty label; labels must be integers or strings")
                split = record.get("split")
                rows.append({"text": text, "label": label, "split": split if isinstance(split, str) else None,
                             "where": f"line {number}"})
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not columns_checked:
        raise UsageError(f"{path}: the file has no examples")
    kinds = {type(row["label"]) for row in rows}
    if len(kinds) > 1:
        raise UsageError(f"{path}: the labels mix integers and strings; use one or the other")
    return rows


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


def _check_columns(path: pathlib.Path, columns: list) -> None:
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        found = ", ".join(str(c) for c in columns) if columns else "none"
        raise UsageError(
            f"{path}: no {' or '.join(repr(c) for c in missing)} column (found: {found}); "
            "a classification file needs 'text' and 'label' columns"
        )


def _classification_task(name: str, rows: list[dict], seed: int, validation_fraction: float,
                         test_fraction: float) -> Task:
    if not rows:
        raise UsageError(f"{name}: the file has no examples")
    # labels: integers keep their order, strings are sorted; either way mapped to 0..K-1
    values = sorted({row["label"] for row in rows}, key=lambda v: (isinstance(v, str), v))
    if len(values) < 2:
        raise UsageError(f"{name}: every example has the label {values[0]!r}; classification needs at least 2 labels")
    index = {value: i for i, value in enumerate(values)}
    label_names = [str(v) for v in values]
    with_split = [row for row in rows if row.get("split")]
    if with_split and len(with_split) != len(rows):
        missing = next(row for row in rows if not row.get("split"))
        raise UsageError(f"{name}: some rows have a 'split' value and others not (first without: {missing['where']})")
    splits: dict[str, list] = {s: [] for s in SPLITS}
    if with_split:
        for row in rows:
            split = _SPLIT_NAMES.get(row["split"].strip().lower())
            if split is None:
                raise UsageError(
                    f"{name}: {row['where']} has the split {row['split']!r}; expected train, validation or test"
                )
            splits[split].append({"text": row["text"], "label": index[row["label"]]})
    else:
        by_label = [[{"text": row["text"], "label": index[value]} for row in rows if row["label"] == value]
                    for value in values]
        splits = stratified_split(by_label, seed, validation_fraction, test_fraction)
    for split in SPLITS:
        if not splits[split]:
            how = "the file's 'split' column" if with_split else (
                f"a stratified {1 - validation_fraction - test_fraction:.0%}/{validation_fraction:.0%}/"
                f"{test_fraction:.0%} split of {len(rows)} examples in {len(values)} labels"
            )
            raise UsageError(f"{name}: the {split} split is empty ({how}); add examples")
    return Task(name=name, kind=CLASSIFICATION, splits=splits, label_names=label_names)


# ---------------------------------------------------------------------------------------------------------------
# plain text (language modelling)


def _read_text_task(path: pathlib.Path) -> Task:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise UsageError(f"{path}: the file is empty")
    return Task(name=str(path), kind=LANGUAGE_MODELING, text=text)


# ---------------------------------------------------------------------------------------------------------------
# datasets hub


def _load_hub_dataset(name: str, seed: int, validation_fraction: float, test_fraction: float) -> Task:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise UsageError(
            f"task '{name}' is not 'bbc-news' nor an existing file, and reading it as a hub dataset needs the "
            "'datasets' package (pip install datasets) and a network"
        ) from None
    from datasets import load_dataset

    try:
        dataset = load_dataset(name)
    except Exception as error:  # noqa: BLE001  (any failure of the hub is the user's problem to fix)
        raise UsageError(f"could not load the hub dataset '{name}': {first_line(error)}") from None
    columns = dataset[next(iter(dataset))].column_names
    text_column = next((c for c in ("text", "sentence", "content", "document") if c in columns), None)
    if text_column is None:
        raise UsageError(f"hub dataset '{name}' has no text column (columns: {', '.join(columns)})")
    if "label" not in columns:
        # a corpus without labels: language modelling on its text
        text = "\n\n".join(t for split in dataset for t in dataset[split][text_column] if t)
        if not text.strip():
            raise UsageError(f"hub dataset '{name}': no text")
        return Task(name=name, kind=LANGUAGE_MODELING, text=text)
    names_feature = getattr(dataset[next(iter(dataset))].features["label"], "names", None)
    rows = []
    for split in dataset:
        mapped = _SPLIT_NAMES.get(split.lower())
        for i, (text, label) in enumerate(zip(dataset[split][text_column], dataset[split]["label"])):
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise UsageError(f"hub dataset '{name}', split {split}, row {i}: label {label!r} is not an integer or string")
            if isinstance(label, int) and label < 0:
                continue  # unlabelled test rows (GLUE uses -1)
            rows.append({"text": text, "label": label, "split": mapped, "where": f"split {split} row {i}"})
    if not {"train", "validation", "test"} <= {row["split"] for row in rows}:
        # not all three splits present with labels: make our own from every labelled row
        for row in rows:
            row["split"] = None
    task = _classification_task(name, rows, seed, validation_fraction, test_fraction)
    if names_feature is not None and all(name.isdigit() for name in task.label_names):
        task.label_names = [names_feature[int(v)] for v in task.label_names]
    return task


# ---------------------------------------------------------------------------------------------------------------
# encoding


def encode_task(task: Task, tokenizer, max_length: int, seed: int = 0, validation_fraction: float = 0.1,
                test_fraction: float = 0.2) -> dict[str, dict[str, torch.Tensor]]:
    """Tokenize every split: ``{"train": {"input_ids", "attention_mask", "labels"}, ...}``.

    Classification rows are padded / truncated to ``max_length``. A language-modelling corpus is tokenized whole,
    cut into blocks of ``max_length`` tokens (the remainder dropped) and the blocks split by the seed like a
    classification file (validation and test fractions of the blocks, at least one each).
    """
    if task.kind == CLASSIFICATION:
        return {split: tokenize_classification(tokenizer, task.splits[split], max_length) for split in SPLITS}
    ids = tokenizer(task.text, add_special_tokens=False)["input_ids"]
    n_blocks = len(ids) // max_length
    n_test = round(test_fraction * n_blocks)
    n_validation = round(validation_fraction * n_blocks)
    if min(n_test, n_validation, n_blocks - n_test - n_validation) < 1:
        raise UsageError(
            f"{task.name}: {len(ids)} tokens make {n_blocks} blocks of {max_length}; too few for non-empty "
            "train, validation and test splits (use a longer text or a smaller --max-length)"
        )
    blocks = torch.tensor(ids[: n_blocks * max_length]).view(n_blocks, max_length)
    order = list(range(n_blocks))
    random.Random(seed).shuffle(order)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_validation],
             "train": order[n_test + n_validation:]}
    encoded = {}
    for split, rows in parts.items():
        input_ids = blocks[torch.tensor(rows)]
        encoded[split] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                          "labels": input_ids.clone()}
    return {split: encoded[split] for split in SPLITS}

