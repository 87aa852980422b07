"""Adapter folders written atomically with a checksum, and read back and checked before anything is injected.

PEFT's ``save_pretrained`` writes ``adapter_model.safetensors`` and then the config straight into place, so an
interrupted save leaves a half-written file, and safetensors carries no checksum, so flipped bytes in a tensor load
silently. For our methods the weights are written to a temporary file in the same folder and renamed into place,
with a SHA-256 of the tensors in the safetensors metadata; ``SpectralConfig.save_pretrained`` writes the config the
same way. Loading reads the weights when the config is read (``SpectralConfig.from_pretrained``), before PEFT wraps
any module of the user's model.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Callable, Optional

import peft.peft_model
import peft.utils.save_and_load
import torch
from safetensors.torch import load as load_safetensors_bytes

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # safe_serialization=False
CHECKSUM_KEY = "spectral_peft_sha256"
# method prefixes ("loca_", ...) registered by register_method: the writer below only changes how their files are written
SPECTRAL_PREFIXES: set[str] = set()

_stock_save_file = peft.peft_model.safe_save_file
_stock_load_file = peft.utils.save_and_load.safe_load_file
# folder -> checksum of the weights just written there, for the config PEFT writes next (SpectralConfig.save_pretrained)
_written: dict[str, str] = {}


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path`` (never half-written)."""
    # same folder, so the rename stays on one file system; created by ``write`` with the usual permissions
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def holds_spectral_tensors(keys) -> bool:
    return any(holds_spectral_tensors_of(keys, prefix) for prefix in SPECTRAL_PREFIXES)


def save_file(tensors: dict, filename: str, metadata: Optional[dict] = None) -> None:
    """Stands in for the ``safe_save_file`` that ``PeftModel.save_pretrained`` calls: other methods' files are
    written exactly as before; ours atomically and with a checksum."""
    if not holds_spectral_tensors(tensors):
        return _stock_save_file(tensors, filename, metadata=metadata)
    checksum = tensor_checksum(tensors)
    atomic_write(filename, lambda tmp: _stock_save_file(tensors, tmp, metadata={**(metadata or {}), CHECKSUM_KEY: checksum}))
    _written[os.path.realpath(os.path.dirname(filename))] = checksum


def take_written_checksum(folder: str) -> Optional[str]:
    """The checksum of the weights just saved into ``folder`` (once), or None."""
    return _written.pop(os.path.realpath(folder), None)


def load_file(filename: str, device="cpu") -> dict:
    """Stands in for the reader of PEFT's ``load_peft_weights``: our methods' tensors under a config of a stock
    method (``peft_type`` LORA, FOURIERFT, ...) are refused. That method's loader would skip them as unknown keys
    and leave its own adapter empty or random: a silently wrong model."""
    tensors = _stock_load_file(filename, device=device)
    prefixes = sorted(p for p in SPECTRAL_PREFIXES if holds_spectral_tensors_of(tensors, p))
    config_path = os.path.join(os.path.dirname(filename), "adapter_config.json")
    if prefixes and os.path.isfile(config_path):
        with open(config_path) as f:
            peft_type = str(json.load(f).get("peft_type"))
        if f"{peft_type.lower()}_" not in prefixes:
            raise ValueError(f"{filename} holds {', '.join(prefixes)} tensors but {config_path} says peft_type "
                             f"'{peft_type}': the config belongs to another method")
    return tensors


def holds_spectral_tensors_of(keys, prefix: str) -> bool:
    return any(key.rsplit(".", 1)[-1].startswith(prefix) for key in keys)


def install_writer() -> None:
    """Route PEFT's adapter file writes and reads through :func:`save_file` and :func:`load_file`."""
    peft.peft_model.safe_save_file = save_file
    peft.utils.save_and_load.safe_load_file = load_file


def read_weights(folder: str, config_checksum: Optional[str] = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(path, tensors) of the adapter weights in ``folder``; a ValueError naming the file if they are unreadable,
    do not match their checksum or are not the weights the config was saved with (``config_checksum``), a
    FileNotFoundError if there are none."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
        try:
            tensors = load_safetensors_bytes(data)
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        except Exception as error:  # noqa: BLE001  (safetensors raises its own error type)
            raise ValueError(f"{path}: cannot be read, the file is truncated or corrupt ({error})") from None
        expected = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
        if expected is not None and tensor_checksum(tensors) != expected:
            raise ValueError(f"{path}: the tensors do not match the checksum written when the adapter was saved; "
                             "the file was modified or corrupted")
        # both written by save_pretrained and different: the pair of an interrupted save (a file rewritten by
        # another tool carries no checksum and is judged by the other checks alone)
        if config_checksum is not None and expected is not None and expected != config_checksum:
            raise ValueError(f"{path}: not the weights adapter_config.json was saved with (weights_checksum differs); "
                             "a save was interrupted between the two files, or one of them was replaced")
        return path, tensors
    path = os.path.join(folder, PICKLE_NAME)
    if os.path.isfile(path):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"{path}: cannot be read, the file is truncated or corrupt ({error})") from None
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (or {PICKLE_NAME}) beside adapter_config.json")
