"""Files the commands write, each atomically (a temporary file, then renamed): an interrupted command never leaves
a half-written one behind."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from spectral_peft.adapter_files import atomic_write


def write_json(path: pathlib.Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: pathlib.Path, text: str) -> None:
    atomic_write(str(path), lambda tmp: pathlib.Path(tmp).write_text(text))


def save_model(model, output: pathlib.Path) -> dict:
    """``save_pretrained`` into a temporary folder, then each file moved into ``output``; returns file sizes."""
    tmp = output / ".save.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    sizes = {}
    for path in sorted(tmp.iterdir()):
        if path.is_file():
            sizes[path.name] = path.stat().st_size
            os.replace(path, output / path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return sizes


def weight_bytes(sizes: dict) -> int:
    """The bytes of the weights files among ``save_model``'s file sizes."""
    return sum(size for name, size in sizes.items() if name.endswith((".safetensors", ".bin")))
