"""LoCA through stock PEFT's whole life cycle on tiny BERT, GPT-2 (Conv1D, non-square) and Llama (GQA, non-square).

Mirrors the checks PEFT's own test-suite runs for every method: starts as the base model, only adapter parameters
train, save/load round trip (in this process and in a fresh one), merge == unmerged, merge is idempotent, unmerge
restores, merge_and_unload, disable_adapter, several named adapters, half precision, and the targeting options.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

import spectral_peft
from spectral_peft.loca import LocaLinear
from spectral_peft.spectral import random_cells

from ..conftest import ModelCase, make_input_ids

PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------------------------
# helpers


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.detach().clone()


def loca_layers(model) -> dict[str, LocaLinear]:
    """LoCA layers by their name inside the transformers model (PEFT's 'base_model.model.' removed)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LocaLinear):
            out[name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name] = module
    return out


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in loca_layers(model).items()}


def make_peft(case: ModelCase, seed: int = 0, **overrides):
    """(peft model, base logits before wrapping, input ids)."""
    base = case.build(seed)
    ids = make_input_ids()
    expected = logits(base, ids)
    model = get_peft_model(base, case.config(**overrides))
    model.eval()
    return model, expected, ids


def randomize_adapter(model, adapter: str = "default", scale: float = 0.1, seed: int = 7) -> None:
    """Non-zero coefficients and fresh locations, so the adapter changes the output and locations must be kept."""
    generator = torch.Generator().manual_seed(seed)
    for layer in loca_layers(model).values():
        coefficients = layer.loca_coefficients[adapter]
        coefficients.data.copy_(torch.randn(coefficients.shape, generator=generator) * scale)
        layer.set_locations(adapter, random_cells(layer.shape, coefficients.numel(), generator))


def random_labels(case: ModelCase, input_ids: torch.Tensor, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if case.is_causal_lm():
        return torch.randint(0, 100, input_ids.shape, generator=generator)
    return torch.randint(0, 3, (input_ids.shape[0],), generator=generator)


def train_steps(model, case: ModelCase, input_ids, steps: int = 3, lr: float = 1e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.Adam(params, lr=lr)
    labels = random_labels(case, input_ids)
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def assert_differs(a: torch.Tensor, b: torch.Tensor, min_diff: float = 1e-4) -> None:
    diff = (a.float() - b.float()).abs().max().item()
    assert diff > min_diff, f"outputs should differ but max |diff| = {diff}"


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = "") -> None:
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= atol, f"{what}: max |diff| = {diff} > {atol}"


# ----------------------------------------------------------------------------------------------------------------
# creation


def test_targets_resolved(case):
    model, _, _ = make_peft(case)
    layers = loca_layers(model)
    assert sorted(layers) == sorted(case.adapted_modules)
    config = model.peft_config["default"]
    assert config.peft_type == "LOCA"
    assert set(config.target_modules) == set(case.resolved_targets)
    for name, layer in layers.items():
        assert layer.shape == spectral_peft.layer.base_layer_shape(layer.get_base_layer(), name)
        assert layer.loca_coefficients["default"].shape == (case.n_frequency,)
        assert layer.loca_locations["default"].shape == (2, case.n_frequency)


def test_gpt2_default_targets_are_conv1d_c_attn(tiny_gpt2):
    from transformers.pytorch_utils import Conv1D

    model = get_peft_model(tiny_gpt2, spectral_peft.LocaConfig(n_frequency=16))
    layers = loca_layers(model)
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    for layer in layers.values():
        assert isinstance(layer.get_base_layer(), Conv1D)
        assert layer.fan_in_fan_out
        assert layer.shape == (96, 32)  # (out, in): non-square


def test_init_output_equals_base_exactly(case):
    model, expected, ids = make_peft(case)
    for layer in loca_layers(model).values():
        assert torch.count_nonzero(layer.loca_coefficients["default"]) == 0
    out = logits(model, ids)
    assert torch.equal(out, expected), (out - expected).abs().max()


def test_trainable_parameters(case, capsys):
    model, _, _ = make_peft(case)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    layers = loca_layers(model)
    expected_adapter_names = set()
    for name in layers:
        for kind in ("loca_coefficients", "loca_locations"):
            expected_adapter_names.add(f"{PEFT_PREFIX}{name}.{kind}.default")
    adapter_names = {n for n in trainable if "modules_to_save" not in n}
    assert adapter_names == expected_adapter_names
    others = set(trainable) - adapter_names
    if case.modules_to_save:
        assert others, "modules_to_save should be trainable"
        for name in others:
            assert any(f"{m}.modules_to_save.default." in name for m in case.modules_to_save), name
    else:
        assert not others
    # every adapter parameter carries the method prefix and no frozen parameter does
    for name, p in model.named_parameters():
        if "loca_" in name:
            assert name in trainable and re.search(r"\.loca_(coefficients|locations)\.default$", name), name
    for name, p in trainable.items():
        if "loca_locations" in name:
            assert p.dtype == torch.float32
    n_trainable = sum(p.numel() for p in trainable.values())
    assert n_trainable == 3 * case.n_frequency * len(layers) + sum(p.numel() for n, p in trainable.items() if n in others)

    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    match = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", printed)
    assert match, printed
    assert int(match.group(1).replace(",", "")) == n_trainable


def test_training_changes_only_adapter(case):
    model, _, ids = make_peft(case)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers_before = {name: b.detach().clone() for name, b in model.named_buffers() if "loca_" not in name}
    losses = train_steps(model, case, ids, steps=4, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = set()
    for name, p in model.named_parameters():
        if not torch.equal(p.detach(), before[name]):
            changed.add(name)
    for name in changed:
        assert "loca_" in name or "modules_to_save" in name, f"a base parameter changed: {name}"
    for name, p in model.named_parameters():
        if "loca_" not in name and "modules_to_save" not in name:
            assert torch.equal(p.detach(), before[name]), name  # bit-identical
    for name, b in model.named_buffers():
        if name in buffers_before:
            assert torch.equal(b, buffers_before[name]), name
    # every layer's coefficients moved, the head copy too
    for layer_name in loca_layers(model):
        assert f"{PEFT_PREFIX}{layer_name}.loca_coefficients.default" in changed, layer_name
    if case.modules_to_save:
        assert any("modules_to_save" in n for n in changed)
        for name in before:
            if "original_module" in name:
                assert name not in changed
    # the adapted model no longer computes the base function
    base = case.build(0)
    assert_differs(logits(model, ids), logits(base, ids), 1e-6)


def test_activation_and_dense_paths_agree(case):
    model, _, ids = make_peft(case)
    randomize_adapter(model)
    outs = {}
    for path in ("activation", "dense", "auto"):
        for layer in loca_layers(model).values():
            layer.spectral_path = path
        outs[path] = logits(model, ids)
    assert_close(outs["activation"], outs["dense"], 1e-5, "activation vs dense")
    assert_close(outs["auto"], outs["dense"], 1e-5, "auto vs dense")


# ----------------------------------------------------------------------------------------------------------------
# save / load


def test_save_and_load_round_trip(case, tmp_path):
    model, base_out, ids = make_peft(case)
    train_steps(model, case, ids, steps=2)
    randomize_adapter(model)  # locations moved away from wherever a fresh draw would put them
    expected = logits(model, ids)
    assert_differs(expected, base_out)
    model.save_pretrained(tmp_path)

    adapter_file = tmp_path / "adapter_model.safetensors"
    assert adapter_file.is_file()
    assert (tmp_path / "adapter_config.json").is_file()
    with safe_open(str(adapter_file), framework="pt") as f:
        keys = list(f.keys())
        saved = {k: f.get_tensor(k) for k in keys}
    n_layers = len(case.adapted_modules)
    assert sum(k.endswith("loca_coefficients") for k in keys) == n_layers, keys
    assert sum(k.endswith("loca_locations") for k in keys) == n_layers, keys
    assert not any("base_layer" in k for k in keys), keys
    if case.modules_to_save:
        assert any("classifier" in k for k in keys), keys
    for k, v in saved.items():
        if k.endswith("loca_locations"):
            assert v.shape == (2, case.n_frequency) and v.dtype == torch.float32

    torch.manual_seed(999)  # a different RNG state: the fresh initial locations must be overwritten by the file
    fresh = case.build(0)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert loaded.peft_config["default"].peft_type == "LOCA"
    out = logits(loaded, ids)
    assert_close(out, expected, 1e-6, "reloaded adapter")
    original_layers, loaded_layers = loca_layers(model), loca_layers(loaded)
    assert original_layers.keys() == loaded_layers.keys()
    for name in original_layers:
        assert torch.equal(original_layers[name].loca_cells["default"], loaded_layers[name].loca_cells["default"])
        assert torch.equal(
            original_layers[name].loca_coefficients["default"], loaded_layers[name].loca_coefficients["default"]
        )


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, transformers
    import spectral_peft
    from peft import PeftModel

    failures = 0
    for item in torch.load(sys.argv[1]):
        base = getattr(transformers, item["auto_class"]).from_pretrained(item["base_dir"]).eval()
        model = PeftModel.from_pretrained(base, item["adapter_dir"]).eval()
        assert type(model.base_model).__name__ == "LocaModel", type(model.base_model)
        with torch.no_grad():
            out = model(input_ids=item["input_ids"]).logits
        diff = (out - item["expected"]).abs().max().item()
        print(item["name"], "max abs diff", diff)
        failures += not diff <= 1e-6
    sys.exit(3 if failures else 0)
    """
)


def test_load_in_fresh_process(tmp_path):
    """Every tiny model's adapter, reloaded by a new interpreter (one for all, to keep the test fast)."""
    from ..conftest import MODEL_CASES

    manifest = []
    for case in MODEL_CASES:
        folder = tmp_path / case.name
        case.build(0).save_pretrained(folder / "base")
        model, base_out, ids = make_peft(case)
        randomize_adapter(model)
        expected = logits(model, ids)
        assert_differs(expected, base_out)
        model.save_pretrained(folder / "adapter")
        manifest.append(dict(name=case.name, auto_class=case.auto_class, base_dir=str(folder / "base"),
                             adapter_dir=str(folder / "adapter"), input_ids=ids, expected=expected))
    torch.save(manifest, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    for case in MODEL_CASES:
        assert f"{case.name} max abs diff" in result.stdout, result.stdout


# ----------------------------------------------------------------------------------------------------------------
# merging


def test_merge_unmerge(case):
    model, base_out, ids = make_peft(case)
    randomize_adapter(model)
    unmerged = logits(model, ids)
    assert_differs(unmerged, base_out)
    weights = base_weights(model)

    model.merge_adapter()
    for layer in loca_layers(model).values():
        assert layer.merged and layer.merged_adapters == ["default"]
    changed = [n for n, w in base_weights(model).items() if not torch.equal(w, weights[n])]
    assert sorted(changed) == sorted(weights), "merge must write into every base weight"
    merged = logits(model, ids)
    assert_close(merged, unmerged, 1e-5, "merged vs unmerged")

    # merging again is refused with a warning and does not add the update twice
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    for layer in loca_layers(model).values():
        assert layer.merged_adapters == ["default"]
    assert_close(logits(model, ids), merged, 1e-6, "merged twice")

    model.unmerge_adapter()
    for name, w in base_weights(model).items():
        assert not loca_layers(model)[name].merged
        assert_close(w, weights[name], 1e-6, f"base weight of {name} after unmerge")
    assert_close(logits(model, ids), unmerged, 1e-5, "after unmerge")


def test_safe_merge_equals_unmerged(case):
    model, _, ids = make_peft(case)
    randomize_adapter(model)
    unmerged = logits(model, ids)
    model.merge_adapter(safe_merge=True)
    assert_close(logits(model, ids), unmerged, 1e-5, "safe merge")


def test_merge_and_unload(case):
    model, base_out, ids = make_peft(case)
    randomize_adapter(model)
    unmerged = logits(model, ids)
    assert_differs(unmerged, base_out)
    plain = model.merge_and_unload()
    assert type(plain) is type(case.build(0))
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert not any("loca_" in n or "base_layer" in n or "modules_to_save" in n for n, _ in plain.named_parameters())
    assert not any("loca_" in n for n, _ in plain.named_buffers())
    assert_close(logits(plain, ids), unmerged, 1e-5, "merge_and_unload")


def test_unload_without_merge_gives_base(case):
    model, base_out, ids = make_peft(case)
    randomize_adapter(model)
    plain = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    if not case.modules_to_save:  # unload keeps the trained copy of modules_to_save: compare where there is none
        assert torch.equal(logits(plain, ids), base_out)


# ----------------------------------------------------------------------------------------------------------------
# disable_adapter


def test_disable_adapter_restores_base_exactly(case):
    model, base_out, ids = make_peft(case)
    randomize_adapter(model)
    adapted = logits(model, ids)
    assert_differs(adapted, base_out)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base_out)
    assert torch.equal(logits(model, ids), adapted)


def test_disable_adapter_while_merged(case):
    model, base_out, ids = make_peft(case)
    randomize_adapter(model)
    adapted = logits(model, ids)
    model.merge_adapter()
    with model.disable_adapter():
        assert_close(logits(model, ids), base_out, 1e-5, "disabled while merged")
    assert_close(logits(model, ids), adapted, 1e-5, "re-enabled")


# ----------------------------------------------------------------------------------------------------------------
# several adapters


def test_multiple_named_adapters(case):
    model, base_out, ids = make_peft(case)
    randomize_adapter(model, "default", seed=11)
    out_default = logits(model, ids)
    model.add_adapter("second", case.config(n_frequency=32))
    assert set(model.peft_config) == {"default", "second"}
    for layer in loca_layers(model).values():
        assert layer.loca_coefficients["second"].shape == (32,)
        assert not layer.loca_coefficients["second"].requires_grad  # not active yet
    # adding an adapter does not change the active one's output
    assert torch.equal(logits(model, ids), out_default)

    model.set_adapter("second")
    assert model.active_adapter == "second"
    assert torch.equal(logits(model, ids), base_out)  # 'second' starts at zero
    default_before = {n: l.loca_coefficients["default"].detach().clone() for n, l in loca_layers(model).items()}
    train_steps(model, case, ids, steps=3, lr=5e-2)
    for name, layer in loca_layers(model).items():
        assert torch.equal(layer.loca_coefficients["default"], default_before[name]), "inactive adapter trained"
        assert torch.count_nonzero(layer.loca_coefficients["second"]) > 0
    out_second = logits(model, ids)
    assert_differs(out_second, out_default)
    assert_differs(out_second, base_out, 1e-6)

    model.set_adapter("default")
    assert torch.equal(logits(model, ids), out_default)
    model.set_adapter("second")
    assert torch.equal(logits(model, ids), out_second)
    model.set_adapter("default")

    model.delete_adapter("second")
    assert set(model.peft_config) == {"default"}
    for layer in loca_layers(model).values():
        for container in ("loca_coefficients", "loca_locations", "loca_cells", "loca_shape", "loca_scaling",
                          "loca_transform", "loca_phase"):
            assert "second" not in getattr(layer, container), container
        assert "default" in layer.loca_coefficients
    assert not any(".second" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, ids), out_default)


def test_added_adapter_saved_and_loaded_by_name(case, tmp_path):
    model, _, ids = make_peft(case)
    randomize_adapter(model, "default", seed=1)
    model.add_adapter("second", case.config())
    randomize_adapter(model, "second", seed=2)
    model.set_adapter("second")
    out_second = logits(model, ids)
    model.set_adapter("default")
    out_default = logits(model, ids)
    assert_differs(out_second, out_default)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()

    loaded = PeftModel.from_pretrained(case.build(0), tmp_path).eval()
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert_close(logits(loaded, ids), out_default, 1e-6, "default")
    loaded.set_adapter("second")
    assert_close(logits(loaded, ids), out_second, 1e-6, "second")


# ----------------------------------------------------------------------------------------------------------------
# half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(case, dtype):
    base = case.build(0).to(dtype)
    ids = make_input_ids()
    base_out = logits(base, ids)
    model = get_peft_model(base, case.config())
    out = logits(model, ids)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out, base_out)  # zero coefficients: exactly the half-precision base model
    for name, layer in loca_layers(model).items():
        assert layer.get_base_layer().weight.dtype == dtype, name
        assert layer.loca_coefficients["default"].dtype == torch.float32, name
        assert layer.loca_locations["default"].dtype == torch.float32, name

    model.train()
    out = model(input_ids=ids).logits
    assert out.dtype == dtype
    # scaled as torch.amp.GradScaler would: a tiny random BERT's query gradients (~4e-8) underflow in fp16 otherwise
    loss = out.float().pow(2).mean() * 2.0**14
    loss.backward()
    for name, layer in loca_layers(model).items():
        grad = layer.loca_coefficients["default"].grad
        assert grad is not None, name
        assert grad.dtype == torch.float32
        assert torch.isfinite(grad).all(), name
        assert torch.count_nonzero(grad) > 0, name
        loc_grad = layer.loca_locations["default"].grad
        assert loc_grad is None or torch.isfinite(loc_grad).all(), name

    # with non-zero coefficients the half model computes the same adapter as the float32 one
    randomize_adapter(model, scale=1.0)
    adapted = logits(model.eval(), ids)
    assert adapted.dtype == dtype and torch.isfinite(adapted).all()
    base32 = case.build(0)
    base32_out = logits(base32, ids)
    model32 = get_peft_model(base32, case.config())
    randomize_adapter(model32, scale=1.0)
    adapted32 = logits(model32.eval(), ids)
    effect = (adapted32 - base32_out).abs().max().item()
    assert effect > 1e-3
    assert_close(adapted, adapted32, 0.1 * effect, f"{dtype} adapter vs float32 adapter")
