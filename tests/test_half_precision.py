"""bf16 and fp16 base models train with LoCA and S2FT: adapter parameters stay float32 (PEFT's
``autocast_adapter_dtype`` default), losses and gradients are finite and non-zero, every adapted layer returns the
base model's dtype (the float32 transform work does not leak into the activations), and the merged half model
matches the float32 merged model within half precision's own error."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import spectral_peft
from spectral_peft.layer import SpectralLinear

from .conftest import build_bert, build_llama, make_input_ids

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"bert": (build_bert, ["query", "value"]), "llama": (build_llama, ["q_proj", "v_proj"])}
# largest merged-output difference to the float32 merge, relative to the largest output (measured: bf16 up to
# 6e-3, fp16 up to 8e-4)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
STEPS = 8


def batch(step: int, model: str) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1, 100, (4, 8), generator=g)
    return {"input_ids": ids, "labels": ids if model == "llama" else ids[:, 0] % 3}


def build(model: str, method: str, dtype: torch.dtype):
    make, targets = MODELS[model]
    base = make(0).to(dtype)
    if method == "loca":
        config = spectral_peft.LocaConfig(target_modules=targets, n_frequency=16, scaling=10.0, coefficient_steps=2, location_steps=2,
                                          location_learning_steps=6, location_seed=0)
        peft_model = get_peft_model(base, config)
        optimizer = torch.optim.Adam(spectral_peft.loca_param_groups(peft_model, lr=5e-2, location_lr=0.5))
        return peft_model, optimizer, spectral_peft.LocaSchedule(peft_model)
    config = spectral_peft.S2FTConfig(target_modules=targets, n_frequency=16, scaling=10.0, prior="gradient", prior_batches=2)
    peft_model = spectral_peft.prepare_s2ft(base, config, [batch(-1, model), batch(-2, model)])
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    return peft_model, optimizer, None


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", ["loca", "s2ft"])
@pytest.mark.parametrize("model_name", MODELS)
def test_a_half_precision_base_trains_and_merges(model_name, method, dtype, tmp_path):
    model, optimizer, schedule = build(model_name, method, dtype)
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad and "base_layer" not in n}
    assert adapter and all(p.dtype == torch.float32 for p in adapter.values()), {n: p.dtype for n, p in adapter.items()}
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
             for m in model.modules() if isinstance(m, SpectralLinear)]
    model.train()
    moved_by_grad = {"coefficients": 0, "locations": 0}
    for step in range(STEPS):
        loss = model(**batch(step % 2, model_name)).loss
        assert loss.dtype == dtype or loss.dtype == torch.float32
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        loss.backward()
        for name, param in adapter.items():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            for kind in moved_by_grad:
                if f"_{kind}." in name and param.grad.abs().sum() > 0:
                    moved_by_grad[kind] += 1
        optimizer.step()
        optimizer.zero_grad()
        if schedule is not None:
            schedule.step()
    for hook in hooks:
        hook.remove()
    assert set(outputs) == {dtype}  # no adapted layer hands a float32 activation to the next one
    assert moved_by_grad["coefficients"] > 0
    if method == "loca":
        assert moved_by_grad["locations"] > 0  # location phases got finite-difference gradients
    assert all(p.dtype == torch.float32 for p in adapter.values())

    model.eval()
    ids = make_input_ids()
    with model.disable_adapter():
        base = logits(model, ids)
    unmerged = logits(model, ids)
    # reloaded onto a fresh half base: float32 adapter again (autocast_adapter_dtype), the same outputs
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODELS[model_name][0](0).to(dtype), tmp_path, is_trainable=True)
    assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if p.requires_grad)
    assert torch.equal(logits(loaded.eval(), ids), unmerged)
    reference = copy.deepcopy(model).to(torch.float32).merge_and_unload()
    expected = logits(reference, ids)
    merged = model.merge_and_unload()
    assert next(merged.parameters()).dtype == dtype
    got = logits(merged, ids)
    scale = expected.abs().max()
    tolerance = TOLERANCE[dtype] * scale
    assert (expected - base).abs().max() > 2 * tolerance, "the adapter changes too little for the comparison to count"
    assert (got - expected).abs().max() <= tolerance
    assert (unmerged - expected).abs().max() <= tolerance
