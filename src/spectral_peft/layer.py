"""The one sparse-spectrum adapter layer behind every method (LoCA, S2FT, fast FourierFT).

A method subclasses :class:`SpectralLinear`, sets ``prefix`` and a few class flags, and says how the first
locations are drawn. The parameter and buffer containers are named from the prefix (``loca_coefficients``,
``s2ft_row_order``, ...), as PEFT expects, and PEFT saves everything on the layer except ``base_layer``.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .spectral import (
    DELTA_PRODUCTS, TRANSFORMS, PlacementCache, Spectrum, Workspace, apply_delta, can_own_product, check_cells,
    check_permutation, choose_path, delta_weight, folded_linear, linear_with_delta,
)
from .transforms import COMPUTE_DTYPES

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


def base_layer_shape(base_layer: nn.Module, name: str) -> tuple[int, int]:
    """(out_features, in_features) of a supported base layer, or a TypeError naming the module."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.out_features, base_layer.in_features
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return out_features, in_features
    raise TypeError(
        f"Module '{name}' is a {type(base_layer).__name__}; spectral adapters support torch.nn.Linear and "
        f"transformers' Conv1D only. Remove it from target_modules."
    )


class SpectralLinear(nn.Module, BaseTunerLayer):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus sparse-spectrum updates, one per named adapter."""

    # set by each method
    prefix: str = ""
    saves_locations: bool = True  # False where locations are re-drawn from a seed at load (FourierFT mode)
    has_orders: bool = False  # S2FT: row and column orderings
    default_transform: str = "dct"  # where the config has no `transform` field
    # the per-adapter containers after the prefix: the trainable ones, and the other state PEFT moves and deletes
    parameter_kinds: tuple = ("coefficients",)
    state_kinds: tuple = ("locations", "shape", "scaling", "transform")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        orders = ("row_order", "col_order") if cls.has_orders else ()
        seed = () if cls.saves_locations else ("random_loc_seed",)
        cls.adapter_layer_names = tuple(cls.prefix + kind for kind in cls.parameter_kinds)
        cls.other_param_names = tuple(cls.prefix + kind for kind in cls.state_kinds + orders + seed)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "", **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name or type(base_layer).__name__
        self.out_features, self.in_features = base_layer_shape(base_layer, self.module_name)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        # "auto" picks the cheapest of the activation, dense and factored paths; tests and benchmarks may force one.
        self.spectral_path = "auto"
        # what the paths keep between calls: per adapter, and (shared by a tuner's layers) per thread
        self._placements = PlacementCache()
        self.workspace = Workspace()

        self._create_containers()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # ----------------------------------------------------------------------------------------------------------
    # containers

    def _create_containers(self) -> None:
        p = self.prefix
        setattr(self, p + "coefficients", nn.ParameterDict({}))
        if "locations" not in self.parameter_kinds:  # fixed locations: integer cells
            setattr(self, p + "locations", BufferDict({}, persistent=self.saves_locations))
        if self.has_orders:
            setattr(self, p + "row_order", BufferDict({}, persistent=True))
            setattr(self, p + "col_order", BufferDict({}, persistent=True))
        # (out, in) shape the adapter was made for: loading it onto another shape is refused
        setattr(self, p + "shape", BufferDict({}, persistent=True))
        setattr(self, p + "scaling", {})
        setattr(self, p + "transform", {})
        if not self.saves_locations:
            setattr(self, p + "random_loc_seed", {})

    def _container(self, kind: str):
        return getattr(self, self.prefix + kind)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _adapter_names(self) -> list[str]:
        return list(self._container("coefficients").keys())

    # ----------------------------------------------------------------------------------------------------------
    # creating an adapter

    def initial_cells(self, adapter_name: str, n: int, config) -> torch.Tensor:
        """(2, n) long distinct cells for a new adapter; each method decides."""
        raise NotImplementedError

    def initial_coefficients(self, n: int, config) -> torch.Tensor:
        """Zero (``init_weights=True``): the adapted model starts as the base model; else standard normal."""
        return torch.zeros(n) if config.init_weights else torch.randn(n)

    def update_layer(self, adapter_name: str, config, n_frequency: Optional[int] = None, **kwargs) -> None:
        n = config.n_frequency if n_frequency is None else n_frequency
        m, n_in = self.shape
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"Module '{self.module_name}': n_frequency must be a positive integer, got {n!r}")
        if n > m * n_in:
            raise ValueError(
                f"Module '{self.module_name}': n_frequency={n} is larger than its {m} x {n_in} = {m * n_in} entries"
            )
        transform = getattr(config, "transform", self.default_transform)
        if transform not in TRANSFORMS:
            raise ValueError(f"Module '{self.module_name}': transform must be one of {TRANSFORMS}, got {transform!r}")

        cells = self.initial_cells(adapter_name, n, config)
        check_cells(cells, self.shape, f"Module '{self.module_name}'")
        self._container("coefficients")[adapter_name] = nn.Parameter(self.initial_coefficients(n, config))
        self._set_cells(adapter_name, cells)
        if self.has_orders:
            self._container("row_order")[adapter_name] = torch.arange(m)
            self._container("col_order")[adapter_name] = torch.arange(n_in)
        self._container("shape")[adapter_name] = torch.tensor([m, n_in])
        self._container("scaling")[adapter_name] = float(config.scaling)
        self._container("transform")[adapter_name] = transform

        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _set_cells(self, adapter_name: str, cells: torch.Tensor) -> None:
        # The integer cells live on the base weight's device, never on the parameters': under PEFT's
        # low_cpu_mem_usage the parameters are created on "meta" and loaded later, and a buffer without data
        # could never be moved or read.
        self._container("locations")[adapter_name] = cells.long().to(self.get_base_layer().weight.device)

    def set_locations(self, adapter_name: str, cells: torch.Tensor) -> None:
        """Place the coefficients of ``adapter_name`` at ``cells`` ((2, n), distinct, inside the matrix)."""
        check_cells(cells, self.shape, f"Module '{self.module_name}', adapter '{adapter_name}'")
        if cells.shape[1] != self._container("coefficients")[adapter_name].numel():
            raise ValueError(f"Module '{self.module_name}': expected {self._container('coefficients')[adapter_name].numel()} locations, got {cells.shape[1]}")
        with torch.no_grad():
            self._set_cells(adapter_name, cells.round().long())

    def set_orders(self, adapter_name: str, row_order: torch.Tensor, col_order: torch.Tensor) -> None:
        """Install S2FT's row and column orderings (permutations of range(M) and range(N))."""
        for what, order, size in (("row_order", row_order, self.out_features), ("col_order", col_order, self.in_features)):
            check_permutation(order, size, f"Module '{self.module_name}', {self.prefix}{what}")
        device = self._container("row_order")[adapter_name].device
        self._container("row_order")[adapter_name] = row_order.long().to(device)
        self._container("col_order")[adapter_name] = col_order.long().to(device)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # Like PEFT's, but only the coefficients follow the base layer's dtype: locations are cell indices and
        # half precision cannot hold indices above 2048 (fp16) or 256 (bf16) exactly.
        weight = self.get_base_layer().weight
        device = device if device is not None else weight.device
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if not isinstance(container, (nn.ParameterDict, BufferDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            if item.device == torch.device("meta"):
                continue
            if name == self.prefix + "coefficients" and weight.dtype.is_floating_point:
                container[adapter_name] = item.to(device, dtype=weight.dtype)
            else:
                container[adapter_name] = item.to(device)

    # ----------------------------------------------------------------------------------------------------------
    # computing

    def spectrum(self, adapter_name: str) -> Spectrum:
        """What adapter ``adapter_name`` contributes, with what this layer keeps for computing it."""
        spec = Spectrum(
            coefficients=self._container("coefficients")[adapter_name],
            cells=self._spectrum_cells(adapter_name),
            out_features=self.out_features,
            in_features=self.in_features,
            scaling=self._container("scaling")[adapter_name],
            transform=self._container("transform")[adapter_name],
            row_order=self._container("row_order")[adapter_name] if self.has_orders else None,
            col_order=self._container("col_order")[adapter_name] if self.has_orders else None,
        )
        if not torch.compiler.is_compiling():  # a compiled call computes what it needs in its graph
            spec.placement, spec.workspace = self._placements(adapter_name, spec), self.workspace
        return spec

    def _spectrum_cells(self, adapter_name: str) -> torch.Tensor:
        return self._container("locations")[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update (out x in, float32) of one adapter, built with the 2-D inverse transform."""
        return delta_weight(self.spectrum(adapter_name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        coefficients = self._container("coefficients")
        specs = [self.spectrum(name) for name in self.active_adapters if name in coefficients]
        plain = self._plain_call(args, kwargs)
        foldable = self._can_fold(x, args, kwargs)
        tokens = x.numel() // max(self.in_features, 1)
        paths = [self._path(tokens, spec, x.device, foldable) for spec in specs]
        if not plain:
            result = self.base_layer(x, *args, **kwargs)
            for spec, path in zip(specs, paths):
                result = result + DELTA_PRODUCTS[path](x, spec).to(result.dtype)
            return result
        # A plain layer's product is computed here, on the tokens as rows: the result is then a fresh tensor that the
        # activation path adds into in place, and for a float32/64 model the dense updates join the frozen weight
        # (a separate dense product would cost three matmuls in training).
        base = self.get_base_layer()
        # a view of the weight, frozen as it is (PEFT's transpose would wrap a Conv1D's in a new, trainable Parameter,
        # and autograd would then compute a weight gradient for nothing on every step)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        dense = [spec for spec, path in zip(specs, paths) if path == "dense"] if foldable else []
        # A frozen layer computes its own product together with one update (its only dense one, else the first
        # through the activations): backward then makes one input gradient and no weight gradient. A dense update
        # whose locations train stays with autograd, which reads their five-point stencil off one dense gradient.
        own = None
        if (foldable and len(dense) <= 1 and can_own_product(x, weight, base.bias)
                and not torch.compiler.is_compiling()):
            if dense:
                own = None if dense[0].trains_locations else dense[0]
            else:
                own = next((spec for spec, path in zip(specs, paths) if path == "activation"), None)
        for spec in dense:
            if spec is not own:
                weight = weight + delta_weight(spec).to(weight.dtype)
        if own is None:
            result = F.linear(x.reshape(-1, self.in_features), weight, base.bias)
        else:  # own is the one dense update, if there is one
            result = (folded_linear if dense else linear_with_delta)(x, own, weight, base.bias)
        for spec, path in zip(specs, paths):
            if spec is own:
                continue
            if path == "activation":
                result = apply_delta(x, spec, out=result)
            elif path == "factored" or not foldable:
                result = result + DELTA_PRODUCTS[path](x, spec).reshape(result.shape).to(result.dtype)
        return result.reshape(*x.shape[:-1], self.out_features)

    def _path(self, tokens: int, spec: Spectrum, device: torch.device, folded: bool) -> str:
        """The path this call takes for ``spec``: ``spectral_path``, or with "auto" the cost model's choice."""
        if self.spectral_path == "auto":
            path = choose_path(tokens, spec, device, folded)
        elif self.spectral_path in DELTA_PRODUCTS:
            path = self.spectral_path
        else:
            raise ValueError(f"{self.module_name}: spectral_path must be 'auto' or one of {sorted(DELTA_PRODUCTS)}, "
                             f"not {self.spectral_path!r}")
        # torch.compile traces the dense and factored paths whole; the activation path's sparse kernels do not trace
        return "dense" if path == "activation" and torch.compiler.is_compiling() else path

    def _plain_call(self, args: tuple, kwargs: dict) -> bool:
        """Whether the base layer is a plain ``nn.Linear`` or ``Conv1D`` without hooks, called with the input alone:
        its output is then a fresh tensor that nothing else has seen."""
        base = self.get_base_layer()
        return (
            type(base) in SUPPORTED_BASE_LAYERS and not args and not kwargs
            and not base._forward_hooks and not base._forward_pre_hooks
        )

    def _can_fold(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether ``W + dW`` can stand in for the base layer: a plain float32/64 layer (:meth:`_plain_call`). In
        half precision a small ``dW`` would be rounded away in the sum, so it is not."""
        base = self.get_base_layer()
        return (
            self._plain_call(args, kwargs)
            and base.weight.dtype in COMPUTE_DTYPES and x.dtype == base.weight.dtype
        )

    # ----------------------------------------------------------------------------------------------------------
    # merging

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self._container("coefficients"):
                continue
            with torch.no_grad():
                delta = transpose(self.get_delta_weight(name), self.fan_in_fan_out)
                if safe_merge:
                    merged = base.weight.data.float() + delta
                    if not torch.isfinite(merged).all():
                        bad = (~torch.isfinite(self._container("coefficients")[name])).sum().item()
                        raise ValueError(
                            f"Module '{self.module_name}', adapter '{name}': merging gives non-finite weights "
                            f"({bad} non-finite coefficients); the base weights were left unchanged"
                        )
                    base.weight.data.copy_(merged.to(base.weight.dtype))
                else:
                    base.weight.data += delta.to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._container("coefficients"):
                with torch.no_grad():
                    base.weight.data -= transpose(self.get_delta_weight(name), self.fan_in_fan_out).to(base.weight.dtype)

    # ----------------------------------------------------------------------------------------------------------
    # loading and saving: never accept a state that would be a silently wrong model

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the tuner checks every layer before anything loads; this covers loads into the inner model, past the tuner
        self.check_loadable(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def check_loadable(self, state_dict, prefix: str, adapter_names: Optional[list[str]] = None) -> None:
        """Raise a ValueError naming the module, adapter and field if ``state_dict`` (keys under ``prefix``) holds
        a state of this layer that would compute a wrong model: another shape, tensors of the wrong size or kind,
        non-finite coefficients, locations outside the matrix or shared, orderings that are not permutations.

        ``adapter_names``: adapters whose state must be complete (a saved adapter file); others may be partial."""
        p = self.prefix
        saved = [p + "coefficients", p + "shape"] + ([p + "locations"] if self.saves_locations else []) + (
            [p + "row_order", p + "col_order"] if self.has_orders else [])
        for name in self._adapter_names():
            where = f"Module '{self.module_name}', adapter '{name}'"
            # a saved adapter holds its shape record and everything else; a state without the shape record is a
            # partial one composed by hand (e.g. coefficients only) and loads onto the layer's own placement
            present = [key for key in saved if f"{prefix}{key}.{name}" in state_dict]
            complete = adapter_names is not None and name in adapter_names
            if (complete or p + "shape" in present) and len(present) < len(saved):
                missing = ", ".join(key for key in saved if key not in present)
                has = f"has {', '.join(present)} but no" if present else "has no"
                raise ValueError(f"{where}: the saved adapter {has} {missing}")
            self._check_kinds(state_dict, prefix, name, where)
            shape = state_dict.get(f"{prefix}{p}shape.{name}")
            if shape is not None and tuple(int(v) for v in shape.tolist()) != self.shape:
                raise ValueError(
                    f"{where}: the adapter was made for a {tuple(shape.tolist())} weight but this model's is "
                    f"{self.shape} (out, in); it belongs to another base model"
                )
            coefficients = state_dict.get(f"{prefix}{p}coefficients.{name}")
            if coefficients is not None and not torch.isfinite(coefficients).all():
                raise ValueError(f"{where}: {p}coefficients contains NaN or Inf")
            locations = state_dict.get(f"{prefix}{p}locations.{name}")
            if locations is not None:
                check_cells(locations, self.shape, f"{where}, {p}locations")
            if self.has_orders:
                for what, size in (("row_order", self.out_features), ("col_order", self.in_features)):
                    order = state_dict.get(f"{prefix}{p}{what}.{name}")
                    if order is not None:
                        check_permutation(order, size, f"{where}, {p}{what}")

    def _check_kinds(self, state_dict, prefix: str, name: str, where: str) -> None:
        # a tensor of another size would fail in torch only after the layers before it loaded; an integer tensor
        # where floats belong (or the reverse) would be cast silently
        p = self.prefix
        expected = {"coefficients": "float", "shape": "int"}
        if self.saves_locations:
            expected["locations"] = "float" if p + "locations" in self.adapter_layer_names else "int"
        for kind, number in expected.items():
            value = state_dict.get(f"{prefix}{p}{kind}.{name}")
            if value is None:
                continue
            own = self._container(kind)[name]
            if tuple(value.shape) != tuple(own.shape):
                raise ValueError(f"{where}: {p}{kind} has shape {tuple(value.shape)}, expected {tuple(own.shape)}")
            if value.is_floating_point() != (number == "float") or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{where}: {p}{kind} has dtype {value.dtype}, expected {number}")

    def __repr__(self) -> str:
        return f"{self.prefix.rstrip('_')}." + super().__repr__()
