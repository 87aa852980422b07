"""The PEFT tuner shared by every sparse-spectrum method, and registration of a method with stock PEFT."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import warnings

import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import CONFIG_NAME, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, ModulesToSaveWrapper
from transformers.pytorch_utils import Conv1D

from .adapter_files import holds_tensors_of, read_weights
from .layer import SpectralLinear, base_layer_shape
from .spectral import Workspace


class SpectralModel(BaseTuner):
    """Replaces target ``nn.Linear``/``Conv1D`` modules with a method's :class:`SpectralLinear` subclass."""

    prefix: str = ""
    tuner_layer_cls = SpectralLinear
    # the attention projections LoRA targets by default (query/value for BERT and RoBERTa, q/v for Llama,
    # c_attn for GPT-2)
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`")
        n_frequency = config.n_frequency
        for pattern, value in (config.n_frequency_pattern or {}).items():
            if current_key == pattern or re.match(rf"(.*\.)?{pattern}$", current_key):
                n_frequency = value
                break
        undo = getattr(self, "_undo_injection", [])
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, n_frequency=n_frequency)
            undo.append(lambda: target.delete_adapter(adapter_name))
            self._check_file_state(target, current_key, adapter_name)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        base_layer_shape(base, current_key)  # a clear TypeError for unsupported modules
        if config.fan_in_fan_out and not isinstance(base, Conv1D):
            # the layout is read off the module type (Conv1D stores (in, out)), so the flag is only advisory
            warnings.warn(f"fan_in_fan_out=True but '{current_key}' is a {type(base).__name__}; using its (out, in) layout")
        new_module = self.tuner_layer_cls(
            target, adapter_name, config=_with_n_frequency(config, n_frequency), module_name=current_key
        )
        new_module.workspace = self.workspace  # one for all layers: those reading one input share its spectrum
        if adapter_name not in self.active_adapters:
            # an added adapter is not trainable until it is set active
            new_module.requires_grad_(False)
        self._check_file_state(new_module, current_key, adapter_name)
        self._replace_module(parent, target_name, new_module, target)
        undo.append(lambda: setattr(parent, target_name, target))

    @property
    def workspace(self) -> Workspace:
        """Scratch buffers and the shared input spectrum of this model's layers (never saved or copied)."""
        workspace = self.__dict__.get("_workspace")
        if workspace is None:
            workspace = self.__dict__["_workspace"] = Workspace()
        return workspace

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        # all or nothing: when a target fails (n_frequency too large, an unsupported module, a bad tensor in the
        # adapter file being loaded), the targets already wrapped or given the adapter are put back, so the model
        # is left as it was; a failing PeftModel.from_pretrained leaves the user's base model unwrapped
        self._undo_injection = []
        config = self.peft_config[adapter_name]
        # the weights beside a config read from a folder: checked whole, then against each module as it is wrapped
        self._loading = None
        try:
            if getattr(config, "loaded_from", None) is not None:
                self._loading = self._read_adapter_file(config)
                self._check_file_against_model(model, adapter_name)
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            for undo in reversed(self._undo_injection):
                undo()
            raise
        finally:
            self._undo_injection = []
            self._loading = None

    def _read_adapter_file(self, config) -> tuple[str, dict]:
        """(path, tensors) of the weights beside ``config``, read once and checked: readable, the checksum the
        config recorded, this method's tensors and no other method's. The config is then done with its folder."""
        folder, config.loaded_from = config.loaded_from, None
        path, tensors = read_weights(folder, config.weights_checksum)
        own = self.prefix
        others = sorted({p for p in PEFT_TYPE_TO_PREFIX_MAPPING.values() if p != own and holds_tensors_of(tensors, p)})
        if others or not holds_tensors_of(tensors, own):
            held = f"holds {', '.join(others)} tensors" if others else f"holds no {own} tensors"
            raise ValueError(f"{path} {held} but {os.path.join(folder, CONFIG_NAME)} says peft_type "
                             f"{config.peft_type!r}")
        return path, tensors

    def _check_file_against_model(self, model, adapter_name) -> None:
        # before anything is wrapped: the file's spectral tensors belong to modules this config targets, and its
        # other tensors (modules_to_save) fit the model's
        path, tensors = self._loading
        config = self.peft_config[adapter_name]
        own = _tensors(model)
        for key, value in tensors.items():
            name = key.removeprefix("base_model.model.")
            module, _, last = name.rpartition(".")
            if last.startswith(self.prefix):
                targets = config.target_modules
                if targets is not None and not self._check_target_module_exists(config, module):
                    shown = repr(targets) if isinstance(targets, str) else sorted(targets)
                    raise ValueError(f"{path}: holds {last} for '{module}', which the adapter's target_modules "
                                     f"{shown} do not match in this model")
            elif name in own and tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model's is {tuple(own[name].shape)}")
            elif value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{path}: {name} contains NaN or Inf")

    def _check_file_state(self, layer: SpectralLinear, current_key: str, adapter_name: str) -> None:
        if self._loading is None:
            return
        path, tensors = self._loading
        prefix = f"base_model.model.{current_key}."
        state = {f"{k}.{adapter_name}": v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            layer.check_loadable(state, prefix, adapter_names=[adapter_name])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # every layer's state is checked before any tensor is copied, so a bad adapter file loads nothing; an
        # adapter that load_adapter() added for it (inactive, beside others) is removed again
        try:
            for name, layer in self.model.named_modules():
                if isinstance(layer, SpectralLinear):
                    layer.check_loadable(state_dict, f"{prefix}model.{name}.")
            # other tensors (modules_to_save): torch would refuse a wrong size only after the rest had loaded
            for key, value in _tensors(self, prefix).items():
                if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape):
                    raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, the model's is {tuple(value.shape)}")
        except ValueError:
            marker = f".{self.prefix}coefficients."
            loading = {key.split(marker, 1)[1] for key in state_dict if marker in key}
            for name in sorted(loading):
                if name in self.peft_config and name not in self.active_adapters and len(self.peft_config) > 1:
                    self.delete_adapter(name)
            raise
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_finite(self, adapter_names) -> None:
        # with safe_merge, refuse before any layer is merged, so a bad adapter never leaves the model half-merged
        for module in self.model.modules():
            if not isinstance(module, SpectralLinear):
                continue
            coefficients = module._container("coefficients")
            for name in adapter_names if adapter_names is not None else module.active_adapters:
                if name in coefficients and not torch.isfinite(coefficients[name]).all():
                    bad = int((~torch.isfinite(coefficients[name])).sum())
                    raise ValueError(
                        f"Module '{module.module_name}', adapter '{name}': {bad} coefficients are NaN or Inf; "
                        "nothing was merged"
                    )

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_finite(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        if safe_merge:
            self._check_finite(adapter_names)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear") -> None:
        """Add ``adapter_name``, whose update is exactly ``sum_i weights[i] * dW_i`` of ``adapters``.

        Sparse spectra add exactly: on each layer the new adapter holds the cells of all the given adapters (their
        union; coefficients of a shared cell are summed). So it is as large as they are together. S2FT adapters
        must share their row and column orders on every layer they both adapt, and FourierFT-mode adapters their
        ``random_loc_seed`` (their locations are drawn from it again at load). The new adapter is not active;
        ``set_adapter(adapter_name)`` uses it.
        """
        name = type(self).__name__
        if combination_type != "linear":
            raise ValueError(f"{name}.add_weighted_adapter: combination_type must be 'linear' (sparse spectra add "
                             f"exactly, nothing to approximate), got {combination_type!r}")
        if not adapters or len(weights) != len(adapters):
            raise ValueError(f"{name}.add_weighted_adapter: give one weight per adapter, got {len(adapters)} adapters "
                             f"and {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"{name}.add_weighted_adapter: no adapter named {', '.join(map(repr, unknown))}")
        if adapter_name in self.peft_config:
            raise ValueError(f"{name}.add_weighted_adapter: an adapter named {adapter_name!r} already exists")
        configs = [self.peft_config[a] for a in adapters]
        for field in ("transform", "random_loc_seed"):  # what fixes the basis the coefficients are in
            values = {getattr(c, field, None) for c in configs}
            if len(values) > 1:
                raise ValueError(f"{name}.add_weighted_adapter: the adapters' {field} differ ({sorted(map(str, values))});"
                                 " their spectra cannot be added")
        wrappers = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)
                    and sum(a in m.modules_to_save for a in adapters) > 1]
        if wrappers:
            raise ValueError(f"{name}.add_weighted_adapter: {len(wrappers)} modules_to_save are trained by more than "
                             "one of the adapters, and whole modules cannot be added")
        placements = {}
        for layer in (m for m in self.model.modules() if isinstance(m, SpectralLinear)):
            parts = [(layer.spectrum(a), w) for a, w in zip(adapters, weights) if a in layer._container("coefficients")]
            if parts:
                placements[layer] = _weighted_sum(layer, parts, configs[0].scaling)
        n_max = max((cells.shape[1] for cells, _, _ in placements.values()), default=configs[0].n_frequency)
        self.peft_config[adapter_name] = dataclasses.replace(
            configs[0], target_modules=_union_targets(name, configs), n_frequency=n_max, init_weights=True,
            n_frequency_pattern={re.escape(layer.module_name): cells.shape[1]
                                 for layer, (cells, _, _) in placements.items() if cells.shape[1] != n_max},
        )
        self.inject_adapter(self.model, adapter_name)
        with torch.no_grad():
            for layer, (cells, coefficients, orders) in placements.items():
                layer._set_cells(adapter_name, cells)
                if orders is not None:
                    layer.set_orders(adapter_name, *orders)
                layer._container("coefficients")[adapter_name].copy_(coefficients)


def _tensors(module, prefix: str = "") -> dict:
    """Parameters and buffers by state-dict key (without state_dict()'s side effects)."""
    return {**dict(module.named_parameters(prefix.rstrip("."))), **dict(module.named_buffers(prefix.rstrip(".")))}


def _weighted_sum(layer: SpectralLinear, parts: list, scaling: float):
    """(cells, coefficients, orders) of ``sum weight * dW`` over ``parts`` [(spectrum, weight)] of one layer, in
    ``scaling``: the union of their cells (the largest adapter's first, in its order), coefficients of a shared
    cell summed."""
    orders = {(None if s.row_order is None else tuple(s.row_order.tolist()),
               None if s.col_order is None else tuple(s.col_order.tolist())) for s, _ in parts}
    if len(orders) > 1:
        raise ValueError(f"add_weighted_adapter: module '{layer.module_name}': the adapters order its rows and columns "
                         "differently (S2FT), so their spectra are in different bases and cannot be added")
    parts = sorted(parts, key=lambda part: -part[0].cells.shape[1])
    cells = torch.cat([s.cells for s, _ in parts], dim=1)
    scale = scaling if scaling else 1.0
    values = torch.cat([s.coefficients.detach().float() * (w * s.scaling / scale) for s, w in parts])
    flat = cells[0] * layer.in_features + cells[1]
    unique, slot = torch.unique(flat, return_inverse=True)
    first = torch.full_like(unique, flat.numel()).scatter_reduce_(0, slot, torch.arange(flat.numel(), device=flat.device), "amin")
    order = torch.argsort(first)  # the union in order of first appearance
    summed = values.new_zeros(unique.numel()).index_add_(0, slot, values)
    spec = parts[0][0]
    kept_orders = None if spec.row_order is None else (spec.row_order, spec.col_order)
    return cells[:, first[order]], summed[order], kept_orders


def _union_targets(name: str, configs):
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, (set, list)) for t in targets):
        return set().union(*targets)
    raise ValueError(f"{name}.add_weighted_adapter: the adapters' target_modules mix regular expressions and lists")


def _with_n_frequency(config, n_frequency):
    if n_frequency == config.n_frequency:
        return config
    config = copy.copy(config)
    config.n_frequency = n_frequency
    return config


def register_method(config_cls, tuner_cls) -> None:
    """Make stock PEFT know a method by its type string (PEFT >= 0.21 looks these mappings up by string)."""
    peft_type = config_cls.PEFT_TYPE
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix
