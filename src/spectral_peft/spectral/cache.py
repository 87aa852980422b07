"""What the paths keep between calls, and who owns it.

* A :class:`Placement` holds what one adapter's cells and orders fix: the activation path's sparse structure and
  feature reorders, the factored path's basis vectors. A layer keeps one per adapter and replaces it when the cells
  or orders change (moved in place, as LoCA's are, or replaced, as loading and S2FT's preparation do).
* A :class:`Workspace` holds per thread the scratch buffers that blocks of rows reuse, and the half spectrum of the
  last input transformed without an ordering of its own, which layers reading one input (query, key and value)
  share. A tuner keeps one for all its layers.

Neither is saved or copied: a copied or unpickled model starts with empty ones. Their tensors are made outside
``torch.inference_mode`` even when the first call comes under it, so training can use them afterwards.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

import torch

from .spectrum import Spectrum


def _version(tensor: Optional[torch.Tensor]):
    return None if tensor is None else tensor._version


class Placement:
    """What ``spec``'s cells and orders fix, built on first use by each path and kept while they stand."""

    def __init__(self, spec: Spectrum):
        self.cells, self.row_order, self.col_order = spec.cells, spec.row_order, spec.col_order
        self.versions = (_version(spec.cells), _version(spec.row_order), _version(spec.col_order))
        self._built: dict = {}

    def serves(self, spec: Spectrum) -> bool:
        """Whether ``spec`` has the very cells and orders this was built for, unchanged since."""
        return (spec.cells is self.cells and spec.row_order is self.row_order and spec.col_order is self.col_order
                and (_version(spec.cells), _version(spec.row_order), _version(spec.col_order)) == self.versions)

    def get(self, key: tuple, build: Callable[[], object]):
        """``build()``, made once per ``key`` (what it depends on besides the cells and orders: dtype, device)."""
        value = self._built.get(key)
        if value is None:
            with torch.inference_mode(False):
                value = self._built[key] = build()
        return value


def placement_of(spec: Spectrum) -> Placement:
    """The spectrum's kept placement, or one for this call alone."""
    return spec.placement if spec.placement is not None else Placement(spec)


class _Fresh:
    """Never saved or copied with a model: a copied or unpickled one starts empty and builds its own."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class PlacementCache(_Fresh):
    """A layer's placements, one per adapter (see :class:`Placement`)."""

    def __init__(self):
        self._placements: dict[str, Placement] = {}

    def __call__(self, adapter_name: str, spec: Spectrum) -> Placement:
        placement = self._placements.get(adapter_name)
        if placement is None or not placement.serves(spec):
            placement = self._placements[adapter_name] = Placement(spec)
        return placement

    def clear(self) -> None:
        self._placements.clear()


class Scratch:
    """Buffers that blocks of rows reuse: fresh memory is faulted in page by page on first touch, which costs about
    as much as the FFTs when each block allocates its own temporaries (and after a training step's large frees the
    allocator may hand back memory that is fresh again)."""

    def __init__(self, device: torch.device):
        self.device, self.buffers = device, {}

    def __call__(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous (rows, cols) tensor on one flat buffer per use, grown to the largest asked for: layers of
        different widths alternate, and a block's rows vary with the batch. Contiguous, not a slice of a wider
        matrix: a transposing copy from a strided one misses the cache on every element."""
        key = (name, dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < rows * cols:
            with torch.inference_mode(False):
                buffer = self.buffers[key] = torch.empty(rows * cols, dtype=dtype, device=self.device)
        return buffer[: rows * cols].view(rows, cols)


class Workspace(_Fresh):
    """Scratch buffers and the shared input spectrum of a tuner's layers, per thread (see the module docstring).

    On a CPU a thread's scratch is kept between calls (blocks hold about 2^18 elements, so its few buffers take a
    few MB; nothing in them outlives a call, and calls in one thread never overlap); elsewhere each call has its own
    (one block is the whole batch there, and the device's caching allocator already reuses memory).
    """

    def __init__(self):
        self._local = threading.local()

    def scratch(self, device: torch.device) -> Scratch:
        if device.type != "cpu":
            return Scratch(device)
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = Scratch(device)
        return scratch

    def shared_spectrum(self, anchor: torch.Tensor, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The half spectrum ``build()`` of the layer input ``anchor``, shared by every layer that asks with the same
        ``key`` (transform, width, dtype) while ``anchor`` lives unchanged. Only the last input's is kept, and it is
        dropped with its input."""
        entry = getattr(self._local, "shared", None)
        if entry is not None and entry[0]() is anchor and entry[1] == (anchor._version, key):
            return entry[2]
        half = build()
        local = self._local
        local.shared = (weakref.ref(anchor, lambda ref: _drop_shared(local, ref)), (anchor._version, key), half)
        return half


def _drop_shared(local: threading.local, reference: weakref.ref) -> None:
    entry = getattr(local, "shared", None)
    if entry is not None and entry[0] is reference:
        local.shared = None


def workspace_of(spec: Spectrum) -> Workspace:
    """The spectrum's workspace, or one for this call alone."""
    return spec.workspace if spec.workspace is not None else Workspace()
