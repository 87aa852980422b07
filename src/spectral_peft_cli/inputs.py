"""The user's files as the command line checks them before torch loads: a task file's type, encoding and columns,
an image folder's layout, a model folder. The readers in ``spectral_peft.tools`` use the same rules (which columns
hold what, which files of an image folder are images), so a file that passes here is read as checked.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import Problems, UsageError, first_line

BBC_NEWS = "bbc-news"
TABLE_SUFFIXES = (".csv", ".jsonl")
TEXT_SUFFIXES = (".txt",)
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
TEXT, IMAGE = "text", "image"
# UTF-8 that drops a byte-order mark (spreadsheet programs write one)
DEFAULT_ENCODING = "utf-8-sig"
_CHUNK = 1 << 20


def looks_like_path(name: str) -> bool:
    return (
        pathlib.Path(name).suffix.lower() in TABLE_SUFFIXES + TEXT_SUFFIXES
        or name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def check_fractions(validation_fraction: float, test_fraction: float) -> None:
    for what, value in (("validation fraction", validation_fraction), ("test fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise UsageError(f"the {what} must be between 0 and 1 (exclusive), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise UsageError(
            f"the validation and test fractions add up to {validation_fraction + test_fraction:g}; "
            "they must leave something to train on (sum below 1)"
        )


# ---------------------------------------------------------------------------------------------------------------
# encodings


def encoding_of(given: Optional[str]) -> str:
    """The codec a file is read with: the one given (checked), else UTF-8."""
    if given is None:
        return DEFAULT_ENCODING
    try:
        codecs.lookup(given)
    except LookupError:
        raise UsageError(f"--encoding: unknown encoding '{given}' (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return given


def decoding_problem(path: pathlib.Path, error: UnicodeDecodeError, given: Optional[str], offset: int = 0,
                     line: Optional[int] = None) -> str:
    """One line for a file that does not decode: where, and how to say its encoding."""
    where = f"byte {offset + error.start}" + (f", line {line}" if line is not None else "")
    if given is None:
        return (f"{path}: not UTF-8 text ({error.reason} at {where}); give the file's encoding with --encoding, "
                "e.g. --encoding latin-1")
    return f"{path}: cannot be read as {given} ({error.reason} at {where})"


def check_decodes(path: pathlib.Path, given: Optional[str]) -> None:
    """The whole file decodes with its encoding (read in chunks; the error says the byte and line)."""
    decoder = codecs.getincrementaldecoder(encoding_of(given))()
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                line = lines + chunk[: error.start].count(b"\n")
                raise UsageError(decoding_problem(path, error, given, offset, line)) from None
            if not chunk:
                return
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


# ---------------------------------------------------------------------------------------------------------------
# tables (CSV / JSONL)


@dataclass(frozen=True)
class Table:
    """Which columns of a CSV / JSONL hold what: ``kind`` TEXT (``value`` is the text) or IMAGE (``value`` holds
    image paths, relative to the file)."""

    kind: str
    value: str
    label: str
    split: str = "split"


def table_columns(path: pathlib.Path, given_encoding: Optional[str]) -> list:
    """The header of a CSV, or the keys of a JSONL file's first record (a byte that does not decode is replaced:
    :func:`check_decodes` tells of it, and the columns are still checked)."""
    encoding = encoding_of(given_encoding)
    try:
        with open(path, newline="", encoding=encoding, errors="replace") as f:
            if path.suffix.lower() == ".csv":
                return next(csv.reader(f), [])
            for number, line in enumerate(f, start=1):
                if line.strip():
                    return list(_json_object(path, number, line))
    except csv.Error as error:
        raise UsageError(f"{path}: not a valid CSV file ({error})") from None
    return []


def _json_object(path: pathlib.Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: line {number} is not a JSON object")
    return record


def table_layout(path: pathlib.Path, columns: list, args) -> Table:
    """Which of ``columns`` hold the text (or image paths) and the label, from ``--text-column``,
    ``--label-column`` and ``--image-column`` or the usual names; every column missing is one problem."""
    problems = Problems()
    found = ", ".join(str(c) for c in columns) if columns else "none"
    label = getattr(args, "label_column", None) or "label"
    if label not in columns:
        how = "given with --label-column" if getattr(args, "label_column", None) else \
            "name the label column with --label-column"
        problems.add(f"{path}: no '{label}' column (found: {found}); {how}")
    text_column, image_column = getattr(args, "text_column", None), getattr(args, "image_column", None)
    if text_column or image_column:
        kind, value = (TEXT, text_column) if text_column else (IMAGE, image_column)
        if value not in columns:
            problems.add(f"{path}: no '{value}' column (found: {found}), given with --{kind}-column")
    elif "text" in columns or "image" not in columns:
        kind, value = TEXT, "text"
        if "text" not in columns:
            problems.add(f"{path}: no 'text' column (found: {found}); name the text column with --text-column "
                         "(or a column of image paths with --image-column)")
    else:
        kind, value = IMAGE, "image"
    problems.check()
    return Table(kind, value, label)


# ---------------------------------------------------------------------------------------------------------------
# images


# modes whose pixels are 8-bit, which convert to RGB as they are; 16-bit and float images (I;16, I, F) would be
# clipped to white by that conversion
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB",
                             "HSV"})


def check_images(paths: Sequence[str]) -> None:
    """Each file opens as an image with 8-bit pixels: one problem line per file that does not (headers only: a file
    whose pixel data is cut short is reported when it is read). PIL loads in a few tens of milliseconds."""
    from PIL import Image, UnidentifiedImageError

    problems = Problems()
    for path in paths:
        try:
            with Image.open(path) as image:
                mode = image.mode
        except UnidentifiedImageError:
            problems.add(f"{path}: not an image file PIL can read")
            continue
        except OSError as error:
            problems.add(f"{path}: cannot be read ({first_line(error)})")
            continue
        if mode not in EIGHT_BIT_MODES:
            problems.add(f"{path}: pixels of mode {mode} (16-bit or floating point); save it as 8-bit RGB or "
                         "grayscale")
    problems.check()


def image_folder(path: pathlib.Path) -> dict:
    """An image folder's classes (its subfolders, sorted) -> their image files (sorted, any depth); an empty class
    folder, fewer than two classes, and each bad image (:func:`check_images`) is one problem."""
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not classes:
        raise UsageError(f"task folder {path} has no class subfolders; an image folder holds one subfolder of "
                         "images per class")
    problems, files = Problems(), {}
    for folder in classes:
        images = sorted(
            pathlib.Path(root, name) for root, dirs, names in os.walk(folder) for name in names
            if pathlib.Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")
        )
        if not images:
            problems.add(f"{folder}: empty class folder (no {', '.join(IMAGE_SUFFIXES)} files)")
        files[folder.name] = images
    if len(classes) < 2:
        problems.add(f"task folder {path} has one class subfolder ({classes[0].name}); classification needs at least 2")
    problems.catch(check_images, [str(file) for images in files.values() for file in images])
    problems.check()
    return files


# ---------------------------------------------------------------------------------------------------------------
# the checks before a command runs


def check_task(name: Optional[str], args, problems: Problems) -> None:
    """``--task``: a name the commands know, or a file / folder that exists and reads as a task."""
    encoding = getattr(args, "encoding", None)
    if encoding is not None and not problems.passes(encoding_of, encoding):
        return  # an unknown encoding: the file cannot be read to check it
    if name is None or name == BBC_NEWS:
        return
    path = pathlib.Path(name).expanduser()
    if not path.exists():
        if looks_like_path(name):
            problems.add(f"task file not found: {name}")
        return  # a datasets hub name
    suffix = path.suffix.lower()
    if path.is_dir():
        problems.catch(image_folder, path)
    elif suffix not in TABLE_SUFFIXES + TEXT_SUFFIXES:
        problems.add(f"task file '{name}' has an unknown type '{suffix or '(no suffix)'}'; expected .csv or .jsonl "
                     "(columns text or image, and label), .txt (language modelling) or a folder of images")
    else:
        problems.catch(check_decodes, path, encoding)
        if suffix in TABLE_SUFFIXES:
            columns = problems.catch(table_columns, path, encoding)
            if columns == []:
                problems.add(f"{path}: the file has no examples")
            elif columns is not None:
                problems.catch(table_layout, path, columns, args)


def check_model_folder(name: Optional[str], what: str = "model") -> None:
    """A model given as a path: a folder with a config.json. Other names are hub ids (checked when loaded)."""
    if name is None:
        return
    candidate = pathlib.Path(name).expanduser()
    if candidate.exists():
        if not candidate.is_dir():
            raise UsageError(f"{what} '{name}' is a file; expected a Hugging Face model folder or a hub id")
        if not (candidate / "config.json").is_file():
            raise UsageError(f"{what} folder '{name}' has no config.json; it is not a Hugging Face model folder")
    elif looks_like_path(name):
        raise UsageError(f"{what} folder not found: {name}")
