"""``SpectralLinear.forward``: the dense updates folded into the frozen weight give what the separate paths give."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from spectral_peft import FastFourierFTConfig, LocaConfig
from spectral_peft import layer as layer_module
from spectral_peft.layer import SpectralLinear

from .conftest import build_bert, build_gpt2, make_input_ids

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "loca": lambda: LocaConfig(target_modules=["query", "value", "c_attn"], n_frequency=40),
    "fastfourierft": lambda: FastFourierFTConfig(target_modules=["query", "value", "c_attn"], n_frequency=40,
                                                 init_weights=False),
}


def adapted(build, method: str, dtype=torch.float32):
    torch.manual_seed(1)
    model = get_peft_model(build(0).to(dtype), CONFIGS[method]())
    for name, p in model.named_parameters():
        if "coefficients" in name:
            with torch.no_grad():
                p.normal_(0, 5.0)  # an update large enough to see
    return model


def layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, SpectralLinear)]


def run(model, path: str, ids):
    for layer in layers(model):
        layer.spectral_path = path
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "coefficients" in n}
    return out.detach(), grads


@pytest.mark.parametrize("build", [build_bert, build_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_folded_dense_path_matches_the_activation_path(build, method):
    # float64, so that the two orders of summation agree to rounding far below any real difference
    model = adapted(build, method, torch.float64)
    ids = make_input_ids(batch=8, seq_len=32)  # 256 tokens on 32-wide layers: the cost model folds
    for layer in layers(model):
        assert layer._can_fold(torch.zeros(1, layer.in_features, dtype=torch.float64), (), {})
        assert layer._path(ids.numel(), layer.spectrum("default"), torch.device("cpu"), folded=True) == "dense"
    folded, folded_grads = run(model, "auto", ids)
    separate, separate_grads = run(model, "activation", ids)
    torch.testing.assert_close(folded, separate, atol=1e-9 * float(separate.abs().max()), rtol=0)
    for name, grad in separate_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(folded_grads[name], grad, atol=1e-9 * float(grad.abs().max()), rtol=0)
    with model.disable_adapter():
        base = model(input_ids=ids).logits.detach()
    assert (folded - base).abs().max() > 1e-3  # the update is really in the folded product


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_never_folded(dtype):
    # W + dW in half precision would round a small dW away
    model = adapted(build_bert, "loca").to(dtype)
    layer = layers(model)[0]
    assert not layer._can_fold(torch.zeros(1, layer.in_features, dtype=dtype), (), {})


def test_a_base_layer_with_a_hook_is_not_folded():
    model = adapted(build_bert, "loca")
    layer = layers(model)[0]
    handle = layer.get_base_layer().register_forward_hook(lambda module, inputs, output: output * 2)
    try:
        assert not layer._can_fold(torch.zeros(1, layer.in_features), (), {})
    finally:
        handle.remove()


@pytest.mark.parametrize("build", [build_bert, build_gpt2], ids=["linear", "conv1d"])
def test_activation_path_adds_into_the_layer_output_and_leaves_a_hooked_output_alone(build):
    # the activation path adds into the plain layer's own product in place; with a hook on the base layer (which
    # may keep its output) it must add out of place, and the hook must see the base output alone
    model = adapted(build, "loca", torch.float64)
    ids = make_input_ids(batch=2, seq_len=8)
    plain, plain_grads = run(model, "activation", ids)
    seen = []
    handles = [layer.get_base_layer().register_forward_hook(lambda m, i, o: seen.append((o, o.detach().clone())))
               for layer in layers(model)]
    try:
        hooked, hooked_grads = run(model, "activation", ids)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and all(torch.equal(output, copy) for output, copy in seen)
    torch.testing.assert_close(hooked, plain, atol=1e-12, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(hooked_grads[name], grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("build", [build_bert, build_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_factored_path_matches_the_activation_path(build, method, hooked):
    # a no-op hook sends the layer through the base layer's own call, where the update is added out of place
    model = adapted(build, method, torch.float64)
    ids = make_input_ids(batch=2, seq_len=8)
    handles = [layer.get_base_layer().register_forward_hook(lambda m, i, o: None)
               for layer in layers(model)] if hooked else []
    try:
        factored, factored_grads = run(model, "factored", ids)
        separate, separate_grads = run(model, "activation", ids)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(factored, separate, atol=1e-9 * float(separate.abs().max()), rtol=0)
    for name, grad in separate_grads.items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(factored_grads[name], grad, atol=1e-9 * float(grad.abs().max()), rtol=0)


def test_an_unknown_spectral_path_is_refused_with_the_module_named():
    model = adapted(build_bert, "loca")
    layer = layers(model)[0]
    layer.spectral_path = "sparse"
    with pytest.raises(ValueError, match=r"query.*spectral_path.*'sparse'"):
        model(input_ids=make_input_ids(batch=1, seq_len=4))


@pytest.mark.parametrize("build", [build_bert, build_gpt2], ids=["linear", "conv1d"])
def test_only_frozen_layers_compute_their_product_with_the_update(build, monkeypatch):
    # a frozen layer's product is computed inside the update's Function (backward then makes one input gradient);
    # a trainable base weight keeps its product outside it, where autograd gives the weight its gradient
    model = adapted(build, "loca", torch.float64)
    ids = make_input_ids(batch=2, seq_len=8)
    fused = []
    real = layer_module.linear_with_delta
    monkeypatch.setattr(layer_module, "linear_with_delta", lambda *args: fused.append(args[2]) or real(*args))
    frozen, frozen_grads = run(model, "activation", ids)
    assert len(fused) == len(layers(model))
    fused.clear()
    base = layers(model)[0].get_base_layer()
    base.weight.requires_grad_(True)
    trainable, trainable_grads = run(model, "activation", ids)
    assert len(fused) == len(layers(model)) - 1
    weight_grad = base.weight.grad.clone()
    run(model, "dense", ids)  # autograd through W + dW: the weight's gradient for reference
    assert weight_grad.abs().max() > 0
    torch.testing.assert_close(weight_grad, base.weight.grad, atol=1e-9 * float(weight_grad.abs().max()), rtol=0)
    torch.testing.assert_close(trainable, frozen, atol=1e-12, rtol=0)
    for name, grad in frozen_grads.items():
        torch.testing.assert_close(trainable_grads[name], grad, atol=1e-9 * float(grad.abs().max()), rtol=0)


@pytest.mark.parametrize("path", ["dense", "activation"])
def test_a_frozen_layer_trains_under_autocast(path):
    # the frozen product runs in bfloat16 under autocast, as the base layer's would, and its gradient comes back in
    # bfloat16; the update and its backward (run inside the autocast region here) compute in float32, with what
    # the first call builds and keeps (the sparse structure) in float32 too
    model = adapted(build_bert, "loca")
    ids = make_input_ids(batch=2, seq_len=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_grads = run(model, path, ids)
    assert cast.dtype == torch.bfloat16
    plain, plain_grads = run(model, path, ids)
    torch.testing.assert_close(cast.float(), plain, atol=0.1 * float(plain.abs().max()), rtol=0)
    for name, grad in plain_grads.items():
        assert cast_grads[name].dtype == grad.dtype and grad.abs().max() > 0
        torch.testing.assert_close(cast_grads[name], grad, atol=0.1 * float(grad.abs().max()), rtol=0)
