"""LoCA's layer: the shared spectral layer whose locations are float parameters that learn.

Each adapter has ``loca_locations`` (2, n) float32 in cell units, trained by the finite-difference gradient of the
spectral paths, and ``loca_cells`` (2, n) long, the cells the layer computes with. After each optimizer step
:meth:`LocaLinear.commit_locations` (called by the schedule) moves a coefficient to the cell its location rounds to,
unless that cell is taken; outside location phases any drift of the floats is undone. The first locations are drawn
uniformly at random.
"""

from __future__ import annotations


import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..layer import SpectralLinear
from ..spectral import Spectrum, module_generator, random_cells
from .locations import resolve_moves


class LocaLinear(SpectralLinear):
    prefix = "loca_"
    parameter_kinds = ("coefficients", "locations")
    state_kinds = ("cells", "shape", "scaling", "transform", "phase")

    def _create_containers(self) -> None:
        super()._create_containers()
        self.loca_locations = nn.ParameterDict({})
        # the integer cells in use: the float locations are proposals checked against these
        self.loca_cells = BufferDict({}, persistent=False)
        self.loca_phase = {}  # adapter -> (train_coefficients, train_locations)
        self.register_load_state_dict_post_hook(self._cells_from_loaded_locations)

    def initial_cells(self, adapter_name: str, n: int, config) -> torch.Tensor:
        seed = config.location_seed
        return random_cells(self.shape, n, None if seed is None else module_generator(seed, self.module_name))

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        self.loca_phase[adapter_name] = (True, False)
        super().update_layer(adapter_name, config, **kwargs)

    def _set_cells(self, adapter_name: str, cells: torch.Tensor) -> None:
        # the cells on the base weight's device, as the shared layer keeps them (never on "meta")
        cells = cells.long().to(self.get_base_layer().weight.device)
        if adapter_name in self.loca_locations:
            self.loca_locations[adapter_name].data.copy_(cells.to(self.loca_locations[adapter_name].dtype))
        else:
            self.loca_locations[adapter_name] = nn.Parameter(cells.float())
        self.loca_cells[adapter_name] = cells

    def spectrum(self, adapter_name: str) -> Spectrum:
        spec = super().spectrum(adapter_name)
        spec.train_coefficients, spec.train_locations = self.loca_phase[adapter_name]
        spec.locations = self.loca_locations[adapter_name]
        return spec

    def _spectrum_cells(self, adapter_name: str) -> torch.Tensor:
        return self.loca_cells[adapter_name]

    # ----------------------------------------------------------------------------------------------------------
    # phases and moves

    def set_phase(self, adapter_name: str, train_coefficients: bool, train_locations: bool) -> None:
        """Which parts of ``adapter_name`` get gradients (the others get zero gradients and do not move)."""
        self.loca_phase[adapter_name] = (bool(train_coefficients), bool(train_locations))

    @torch.no_grad()
    def commit_locations(self, adapter_name: str) -> torch.Tensor:
        """Reconcile the float locations with the cells in use and return the cells, (2, n) long.

        While locations train, a location whose rounded cell changed moves there unless the cell is taken (then it
        is put back on its cell); outside location phases any drift is undone. Locations are clamped to the matrix.
        A forward pass computes with the cells and leaves the floats to the next call here (the schedule's step,
        saving).
        """
        param = self.loca_locations[adapter_name]
        cells = self.loca_cells[adapter_name]
        if param.device.type == "meta":  # not loaded yet (low_cpu_mem_usage): the loaded values become the cells
            return cells
        # between steps FSDP2 holds each rank's shard of a parameter (a DTensor): moves are decided on the whole,
        # which every rank computes alike, and each rank keeps its own shard of the result
        sharded = isinstance(param, DTensor)
        locations = param.full_tensor() if sharded else param
        self._reconcile(locations, cells, adapter_name)
        if sharded:
            param.copy_(distribute_tensor(locations, param.device_mesh, param.placements, src_data_rank=None))
        return cells

    def _reconcile(self, locations: torch.Tensor, cells: torch.Tensor, adapter_name: str) -> None:
        """:meth:`commit_locations` on whole tensors: ``locations`` and ``cells`` are updated in place."""
        if not torch.isfinite(locations).all():
            locations.copy_(cells.to(locations.dtype))
            return
        # clamp the floats themselves, not only their cells: a location pushed past a border would otherwise be
        # saved outside the matrix (and refused at load) while it still computes with the border cell
        locations[0].clamp_(0, self.out_features - 1)
        locations[1].clamp_(0, self.in_features - 1)
        proposed = locations.round().long()
        if torch.equal(proposed, cells):
            return
        if self.loca_phase[adapter_name][1]:
            new_cells = resolve_moves(cells, proposed, self.shape)
            refused = (new_cells != proposed).any(dim=0)
            locations[:, refused] = new_cells[:, refused].to(locations.dtype)
            cells.copy_(new_cells)
        else:
            locations.copy_(cells.to(locations.dtype))

    # ----------------------------------------------------------------------------------------------------------
    # moving, loading and saving

    def _apply(self, fn, recurse=True):
        # model.to(dtype), .half() and the like cast every floating tensor; locations are cell indices, which half
        # precision cannot hold exactly (above 256 in bf16), so they keep float32 through any cast
        kept = {name: param.data for name, param in self.loca_locations.items()}
        super()._apply(fn, recurse)
        for name, data in kept.items():
            param = self.loca_locations[name]
            if param.dtype != data.dtype:
                param.data = data.to(param.device)
                if param.grad is not None:
                    param.grad = param.grad.to(data.dtype)
        return self

    @staticmethod
    def _cells_from_loaded_locations(layer, incompatible_keys) -> None:
        # runs after the containers (child modules) loaded: the cells in use become the loaded locations
        with torch.no_grad():
            for name, param in layer.loca_locations.items():
                if param.device.type != "meta":
                    layer.loca_cells[name] = param.round().long().to(layer.loca_cells[name].device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # whatever the optimizer did since the last step, what is saved is what the model computes with
        for name in self._adapter_names():
            self.commit_locations(name)
        super()._save_to_state_dict(destination, prefix, keep_vars)
