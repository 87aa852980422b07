"""The shared tuner and layer: all-or-nothing injection and loading, incomplete adapter files, empty batches.

Run for every method on tiny random BERTs: LoCA, S2FT (placeholder orderings and locations are enough here) and the
fast FourierFT mode.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import spectral_peft
from spectral_peft.layer import SpectralLinear

from .conftest import build_bert, make_input_ids, rewrite_adapter_weights

CONFIGS = {
    "loca": spectral_peft.LocaConfig,
    "s2ft": spectral_peft.S2FTConfig,
    "fastfourierft": spectral_peft.FastFourierFTConfig,
}
TARGETS = ["query", "value"]


def config(method: str, **overrides):
    kwargs = dict(target_modules=TARGETS, n_frequency=16, modules_to_save=["classifier"])
    kwargs.update(overrides)
    return CONFIGS[method](**kwargs)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.clone()


def module_types(model) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def trained(method: str, seed: int = 0, **overrides):
    model = get_peft_model(build_bert(seed), config(method, **overrides))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith("_coefficients.default"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("failing", ["n_frequency_pattern", "unsupported module"])
def test_a_failing_target_leaves_the_model_as_it_was(method, failing):
    base = build_bert(0)
    before = module_types(base)
    ids = make_input_ids()
    expected = logits(base, ids)
    if failing == "n_frequency_pattern":
        # layer 1's value is reached after layer 0's query and value were wrapped
        bad = config(method, n_frequency_pattern={"1.attention.self.value": 5000})
        message = r"Module '.*layer\.1\.attention\.self\.value'.*n_frequency=5000"
    else:
        bad = config(method, target_modules=r".*\.(query|output\.LayerNorm)")
        message = r"LayerNorm.*Linear and transformers' Conv1D only"
    with pytest.raises((ValueError, TypeError), match=message):
        get_peft_model(base, bad)
    assert module_types(base) == before
    assert not hasattr(base, "peft_config")
    assert torch.equal(logits(base, ids), expected)


@pytest.mark.parametrize("method", CONFIGS)
def test_a_failing_added_adapter_leaves_the_first_one_alone(method):
    model = trained(method)
    ids = make_input_ids()
    expected = logits(model, ids)
    with pytest.raises(ValueError, match="n_frequency=5000"):
        model.add_adapter("other", config(method, n_frequency_pattern={"1.attention.self.value": 5000}))
    assert list(model.peft_config) == ["default"]
    for layer in (m for m in model.modules() if isinstance(m, SpectralLinear)):
        assert list(layer._container("coefficients")) == ["default"]
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("method", CONFIGS)
def test_a_failed_load_adapter_loads_nothing_and_removes_the_added_adapter(method, tmp_path):
    trained(method, seed=1).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    # the last adapted layer's coefficients turn NaN: the layers before it must not have loaded either
    key = sorted(k for k in tensors if "layer.1.attention.self.value" in k and "_coefficients" in k)[0]
    tensors[key][3] = float("nan")
    rewrite_adapter_weights(tmp_path, tensors)

    model = trained(method)
    ids = make_input_ids()
    expected = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.value'.*NaN or Inf"):
        model.load_adapter(str(tmp_path), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), expected)
    with pytest.raises(ValueError):
        model.set_adapter("other")


@pytest.mark.parametrize("method", CONFIGS)
def test_a_failed_load_into_a_model_changes_no_layer(method, tmp_path):
    source = trained(method, seed=1)
    state = {k: v for k, v in source.state_dict().items() if "_coefficients" in k}
    bad = sorted(state)[-1]
    state[bad] = state[bad].clone()
    state[bad][0] = float("inf")
    model = trained(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.load_state_dict(state, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method, dropped", [("loca", "loca_locations"), ("loca", "loca_coefficients"),
                                             ("s2ft", "s2ft_col_order"), ("s2ft", "s2ft_locations"),
                                             ("fastfourierft", "fastfourierft_coefficients")])
def test_an_adapter_file_missing_a_tensor_is_refused(method, dropped, tmp_path):
    trained(method).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "layer.0.attention.self.query" in k and k.endswith(dropped))
    del tensors[key]
    rewrite_adapter_weights(tmp_path, tensors)
    with pytest.raises(ValueError, match=rf"layer\.0\.attention\.self\.query'.*saved adapter has .* but no {dropped}"):
        PeftModel.from_pretrained(build_bert(0), tmp_path)


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("path", ["auto", "activation", "dense"])
@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32)])
def test_an_empty_batch_gives_an_empty_output(method, path, shape):
    model = trained(method)
    layer = next(m for m in model.modules() if isinstance(m, SpectralLinear))
    layer.spectral_path = path
    x = torch.zeros(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 32)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("method", CONFIGS)
def test_a_good_adapter_still_loads(method, tmp_path):
    model = trained(method)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_bert(0), tmp_path)
    ids = make_input_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
