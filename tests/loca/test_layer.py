"""LocaLinear in a model: its forward, dW and location gradient against the dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import spectral_peft
from spectral_peft.loca import LocaLinear
from spectral_peft.spectral import (
    Spectrum,
    delta_weight,
)

from ..spectral.reference import (
    PATHS,
    reference_dw,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def loca_layer():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = get_peft_model(BertForSequenceClassification(config),
                           spectral_peft.LocaConfig(target_modules=["query"], n_frequency=40, scaling=1.5,
                                                    location_seed=0))
    layers = [mod for mod in model.modules() if isinstance(mod, LocaLinear)]
    assert len(layers) == 1
    layer = layers[0]
    with torch.no_grad():
        layer.loca_coefficients["default"].copy_(torch.randn(40))
    return layer


@pytest.mark.parametrize("path", [*PATHS, "auto"])
def test_layer_forward_and_delta_weight_match_reference(loca_layer, path):
    layer = loca_layer
    layer.spectral_path = path
    coefficients = layer.loca_coefficients["default"].detach().double()
    cells = layer.loca_cells["default"]
    assert torch.equal(cells, layer.loca_locations["default"].detach().round().long())
    expected = reference_dw(coefficients, cells, 32, 32, 1.5)
    torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, atol=1e-5, rtol=0)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer(x)
        base = layer.get_base_layer()(x)
    torch.testing.assert_close((out - base).double(), x.double() @ expected.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_layer_location_gradient_matches_dense_computation(loca_layer, path):
    layer = loca_layer
    layer.spectral_path = path
    layer.set_phase("default", train_coefficients=False, train_locations=True)
    x = torch.randn(3, 4, 32)
    r = torch.randn(3, 4, 32)
    (layer(x) * r).sum().backward()
    loc_grad = layer.loca_locations["default"].grad
    coef_grad = layer.loca_coefficients["default"].grad
    assert coef_grad is not None and torch.equal(coef_grad, torch.zeros(40))

    # the same location gradient from an explicit spectrum on the same cells
    spec = Spectrum(
        coefficients=layer.loca_coefficients["default"].detach().clone(), cells=layer.loca_cells["default"].clone(),
        out_features=32, in_features=32, scaling=1.5,
        locations=layer.loca_locations["default"].detach().clone().requires_grad_(True), train_coefficients=False,
        train_locations=True,
    )
    (F.linear(x, delta_weight(spec)) * r).sum().backward()
    torch.testing.assert_close(loc_grad, spec.locations.grad, atol=1e-5, rtol=1e-5)
    assert loc_grad.abs().max() > 1e-3
