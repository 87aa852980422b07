"""Adapter folders: the weights PEFT writes, tied to their config by a checksum, and read back and checked before
anything is injected.

``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` and then calls the config's ``save_pretrained``.
For our methods that records a SHA-256 of the tensors just written (``weights_checksum``) and writes the config to
a temporary file renamed into place, so it is never half-written. At load the weights must match the recorded
checksum: a weights file that is truncated, corrupted, replaced, or left half-written by an interrupted save is
refused with an error naming the file, never loaded as a silently different model.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Callable, Optional

import torch
from safetensors.torch import load as load_safetensors_bytes

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # safe_serialization=False


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


def holds_tensors_of(keys, prefix: str) -> bool:
    """Whether any tensor name's last part starts with a method's ``prefix`` (``loca_coefficients.default``)."""
    return any(key.rsplit(".", 1)[-1].startswith(prefix) for key in keys)


def weights_path(folder: str) -> Optional[str]:
    """The adapter weights file in ``folder`` (safetensors, else PEFT's pickle), or None."""
    for name in (WEIGHTS_NAME, PICKLE_NAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def read_weights(folder: str, config_checksum: Optional[str] = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(path, tensors) of the adapter weights in ``folder``; a ValueError naming the file if they are unreadable or
    do not match ``config_checksum`` (the one recorded when the adapter was saved), a FileNotFoundError if there are
    none."""
    path = weights_path(folder)
    if path is None:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (or {PICKLE_NAME}) beside adapter_config.json")
    try:
        if path.endswith(".safetensors"):
            with open(path, "rb") as f:
                tensors = load_safetensors_bytes(f.read())
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (safetensors and torch raise their own error types)
        raise ValueError(f"{path}: cannot be read, the file is truncated or corrupt ({error})") from None
    if config_checksum is not None and tensor_checksum(tensors) != config_checksum:
        raise ValueError(
            f"{path}: the tensors do not match the weights_checksum that adapter_config.json recorded when the "
            "adapter was saved; the file was modified or corrupted, or a save was interrupted (a file rewritten "
            "on purpose loads once weights_checksum is removed from the config)"
        )
    return path, tensors


def checksum_of_folder(folder: str) -> Optional[str]:
    """The checksum of the weights in ``folder`` (None if there are none): what the config records at save."""
    path = weights_path(folder)
    if path is None:
        return None
    return tensor_checksum(read_weights(folder)[1])
