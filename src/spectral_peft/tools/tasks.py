"""Tasks for ``spectral-peft finetune``: BBC News, a local CSV / JSONL (classification of texts or of images given by
path), a folder of images (one subfolder per class), a text file (language modelling) or a ``datasets`` hub name.

Every loader checks its input and raises :class:`~spectral_peft.tools.errors.UsageError` naming each problem (a
missing file, missing columns, labels that are neither integers nor strings, an unreadable image, an empty split),
before anything is trained or written.

Splits of a CSV / JSONL without a ``split`` column, and of an image folder, follow
:func:`spectral_peft.tools.data.load_bbc_news`: stratified by label, fixed by the seed (for each label in order its
examples, in file order, are shuffled with one ``random.Random(seed)``; the first ``round(test_fraction * count)``
go to test, the next ``round(validation_fraction * count)`` to validation, the rest to train; each split is then
shuffled).
"""

from __future__ import annotations

import argparse
import pathlib
import random
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from spectral_peft_cli.arguments import FILE_FORMAT_DEFAULTS
from spectral_peft_cli.inputs import (
    BBC_NEWS,
    IMAGE,
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    check_decodes,
    check_fractions,
    check_images,
    decoding_problem,
    encoding_of,
    image_folder,
    looks_like_path,
)

from .data import BBC_NEWS_LABELS, load_bbc_news, stratified_split, tokenize_classification
from .errors import Problems, UsageError, first_line
from .tables import read_table

CLASSIFICATION, IMAGE_CLASSIFICATION, LANGUAGE_MODELING = "classification", "image-classification", "language-modeling"
SPLITS = ("train", "validation", "test")
# a split column may name the validation split in any of these ways
_SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "dev": "validation", "test": "test"}


def is_classification(kind: str) -> bool:
    """Texts or images with labels (a head to train and accuracy to measure), as against language modelling."""
    return kind in (CLASSIFICATION, IMAGE_CLASSIFICATION)


@dataclass
class Task:
    """What :func:`load_task` read.

    ``kind`` is :data:`CLASSIFICATION` (``splits`` hold ``{"text", "label"}`` dicts, labels are indexes into
    ``label_names``), :data:`IMAGE_CLASSIFICATION` (``{"image": path, "label"}``) or :data:`LANGUAGE_MODELING`
    (``text`` is the whole corpus, split into blocks once a tokenizer is known, by :func:`encode_task`).
    """

    name: str
    kind: str
    splits: dict = field(default_factory=dict)
    label_names: Optional[list] = None
    text: Optional[str] = None

    @property
    def num_labels(self) -> Optional[int]:
        return len(self.label_names) if self.label_names is not None else None


def file_format(options) -> argparse.Namespace:
    """How a user's file is read (``--text-column``, ``--label-column``, ``--image-column``, ``--encoding``), from
    parsed options or a mapping such as a run's settings (missing ones take the usual names and UTF-8)."""
    get = options.get if isinstance(options, Mapping) else lambda key, default=None: getattr(options, key, default)
    return argparse.Namespace(**{key: get(key, default) for key, default in FILE_FORMAT_DEFAULTS.items()})


def load_task(name: str, seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.2,
              formats=None) -> Task:
    """Read a task by name: ``bbc-news``, a ``.csv`` / ``.jsonl`` / ``.txt`` file, an image folder, or a
    ``datasets`` hub name. ``formats``: how a file is read (see :func:`file_format`; default the usual names)."""
    check_fractions(validation_fraction, test_fraction)
    formats = file_format(formats or {})
    if name == BBC_NEWS:
        return _load_bbc_news(seed, validation_fraction, test_fraction)
    path = pathlib.Path(name).expanduser()
    if not path.exists():
        if looks_like_path(name):
            raise UsageError(f"task file not found: {name}")
        return _load_hub_dataset(name, seed, validation_fraction, test_fraction)
    path = path.resolve()
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = [{"value": str(file), "label": label, "split": None, "where": str(file)}
                for label, files in image_folder(path).items() for file in files]
        return _classification_task(str(path), rows, seed, validation_fraction, test_fraction, IMAGE)
    if suffix in TEXT_SUFFIXES:
        return _read_text_task(path, formats.encoding)
    if suffix not in TABLE_SUFFIXES:
        raise UsageError(
            f"task file '{name}' has an unknown type '{suffix or '(no suffix)'}'; expected .csv or .jsonl (columns "
            "text or image, and label), .txt (language modelling) or a folder of images"
        )
    check_decodes(path, formats.encoding)  # the first bad byte's line, before the rows are read
    kind, rows = read_table(path, formats)
    if kind == IMAGE:
        check_images([row["value"] for row in rows])  # an image folder's were checked as it was listed
    return _classification_task(str(path), rows, seed, validation_fraction, test_fraction, kind)


# ---------------------------------------------------------------------------------------------------------------
# BBC News


def _load_bbc_news(seed: int, validation_fraction: float, test_fraction: float) -> Task:
    try:
        splits = load_bbc_news(seed, validation_fraction=validation_fraction, test_fraction=test_fraction)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    return Task(name=BBC_NEWS, kind=CLASSIFICATION, splits=splits, label_names=list(BBC_NEWS_LABELS))


def _classification_task(name: str, rows: list[dict], seed: int, validation_fraction: float,
                         test_fraction: float, holds: str = "text") -> Task:
    """Rows ``{"value", "label", "split", "where"}`` of texts (``holds`` "text") or image paths ("image") split
    into train, validation and test by their ``split`` values or, without them, stratified by the seed."""
    if not rows:
        raise UsageError(f"{name}: the file has no examples")
    # labels: integers keep their order, strings are sorted; either way mapped to 0..K-1
    values = sorted({row["label"] for row in rows}, key=lambda v: (isinstance(v, str), v))
    if len(values) < 2:
        raise UsageError(f"{name}: every example has the label {values[0]!r}; classification needs at least 2 labels")
    index = {value: i for i, value in enumerate(values)}
    with_split = [row for row in rows if row.get("split")]
    if with_split:
        splits = _given_splits(name, rows, index, holds)
    else:
        by_label = [[{holds: row["value"], "label": index[value]} for row in rows if row["label"] == value]
                    for value in values]
        splits = stratified_split(by_label, seed, validation_fraction, test_fraction)
    for split in SPLITS:
        if not splits[split]:
            how = "the file's 'split' column" if with_split else (
                f"a stratified {1 - validation_fraction - test_fraction:.0%}/{validation_fraction:.0%}/"
                f"{test_fraction:.0%} split of {len(rows)} examples in {len(values)} labels"
            )
            raise UsageError(f"{name}: the {split} split is empty ({how}); add examples")
    kind = IMAGE_CLASSIFICATION if holds == IMAGE else CLASSIFICATION
    return Task(name=name, kind=kind, splits=splits, label_names=[str(v) for v in values])


def _given_splits(name: str, rows: list[dict], index: dict, holds: str) -> dict:
    """The splits a ``split`` column names (every row must have one)."""
    problems = Problems()
    missing = next((row for row in rows if not row.get("split")), None)
    if missing is not None:
        problems.add(f"{name}: some rows have a 'split' value and others not (first without: {missing['where']})")
    splits: dict[str, list] = {s: [] for s in SPLITS}
    for row in rows:
        split = _SPLIT_NAMES.get((row.get("split") or "").strip().lower())
        if split is None and row.get("split"):
            problems.add(f"{name}: {row['where']} has the split {row['split']!r}; expected train, validation or test")
        elif split is not None:
            splits[split].append({holds: row["value"], "label": index[row["label"]]})
    problems.check()
    return splits


# ---------------------------------------------------------------------------------------------------------------
# plain text (language modelling)


def _read_text_task(path: pathlib.Path, encoding: Optional[str]) -> Task:
    data = path.read_bytes()  # read once: decoded here, its first bad byte told with its line
    try:
        text = data.decode(encoding_of(encoding))
    except UnicodeDecodeError as error:
        raise UsageError(decoding_problem(path, error, encoding, line=data[: error.start].count(b"\n") + 1)) from None
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
            rows.append({"value": text, "label": label, "split": mapped, "where": f"split {split} row {i}"})
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
    """Tokenize every split: ``{"train": {"input_ids", "attention_mask", "labels"}, ...}`` (images:
    ``{"pixel_values", "labels"}``, ``tokenizer`` being the model's image processor; pixels are read a batch at a
    time, :class:`~spectral_peft.tools.images.LazyImages`).

    Classification rows are padded / truncated to ``max_length``. A language-modelling corpus is tokenized whole,
    cut into blocks of ``max_length`` tokens (the remainder dropped) and the blocks split by the seed like a
    classification file (validation and test fractions of the blocks, at least one each).
    """
    if task.kind == IMAGE_CLASSIFICATION:
        from .images import encode_images

        return {split: encode_images(task.splits[split], tokenizer) for split in SPLITS}
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

