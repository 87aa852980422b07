"""FastFourierFT against stock PEFT's FourierFT: same locations, same initial coefficients, same model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import FourierFTConfig, PeftModel, get_peft_model
from peft.tuners.fourierft import FourierFTLayer
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from spectral_peft import FastFourierFTConfig
from spectral_peft.fourierft import FastFourierFTLinear

VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")


def build_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        num_labels=3, max_position_embeddings=64,
    )
    return BertForSequenceClassification(config).eval()


def build_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


# name -> (builder, target_modules, fan_in_fan_out, {module suffix: (out, in)} of the adapted layers)
CASES = {
    "bert": (
        build_bert, ["query", "value", "intermediate.dense", "output.dense"], False,
        {"query": (32, 32), "value": (32, 32), "intermediate.dense": (64, 32), "attention.output.dense": (32, 32),
         "layer.0.output.dense": (32, 64), "layer.1.output.dense": (32, 64)},
    ),
    "gpt2": (build_gpt2, ["c_attn", "c_fc"], True, {"c_attn": (96, 32), "c_fc": (128, 32)}),
}


def make_batch(case: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 8), generator=g)
    if case == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}
    return {"input_ids": ids, "labels": ids}


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def stock_and_fast(case: str, seed: int = 5, **overrides):
    """Stock FourierFT and FastFourierFT on deep copies of one base, each after torch.manual_seed(seed)."""
    build, targets, fan_in_fan_out, _ = CASES[case]
    base = build(0)
    kwargs = dict(target_modules=targets, fan_in_fan_out=fan_in_fan_out, **overrides)
    torch.manual_seed(seed)
    stock = get_peft_model(copy.deepcopy(base), FourierFTConfig(**kwargs))
    torch.manual_seed(seed)
    fast = get_peft_model(copy.deepcopy(base), FastFourierFTConfig(**kwargs))
    return base, stock.eval(), fast.eval()


def paired_layers(stock, fast) -> list[tuple[str, FourierFTLayer, FastFourierFTLinear]]:
    stock_layers = {n: m for n, m in stock.named_modules() if isinstance(m, FourierFTLayer)}
    fast_layers = {n: m for n, m in fast.named_modules() if isinstance(m, FastFourierFTLinear)}
    assert set(stock_layers) == set(fast_layers) and stock_layers
    return [(n, stock_layers[n], fast_layers[n]) for n in sorted(stock_layers)]


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**without_labels(batch)).logits


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger magnitude of b (at least 1)."""
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1.0)


# --------------------------------------------------------------------------------------------------------------
# configuration


def test_config_fields_and_defaults_match_stock():
    stock_fields = {f.name for f in dataclasses.fields(FourierFTConfig)}
    fast_fields = {f.name for f in dataclasses.fields(FastFourierFTConfig)}
    assert stock_fields - fast_fields == set(), f"stock FourierFTConfig fields we lack: {stock_fields - fast_fields}"
    stock, fast = FourierFTConfig().to_dict(), FastFourierFTConfig().to_dict()
    differing = {k for k in stock_fields if k != "peft_type" and stock[k] != fast[k]}
    assert differing == set(), {k: (stock[k], fast[k]) for k in differing}
    assert (fast["n_frequency"], fast["scaling"], fast["random_loc_seed"], fast["init_weights"]) == (1000, 150.0, 777, False)
    assert fast["peft_type"] == "FASTFOURIERFT"


# --------------------------------------------------------------------------------------------------------------
# same locations, same initial coefficients, same outputs


@pytest.mark.parametrize("case", ["bert", "gpt2"])
@pytest.mark.parametrize("n_frequency", [None, 200])
def test_same_initialisation_and_outputs(case, n_frequency):
    overrides = {} if n_frequency is None else {"n_frequency": n_frequency}
    base, stock, fast = stock_and_fast(case, **overrides)
    expected_shapes = CASES[case][3]
    layers = paired_layers(stock, fast)
    n = 1000 if n_frequency is None else n_frequency
    for name, s, f in layers:
        shape = next(v for k, v in expected_shapes.items() if name.endswith(k))
        assert (f.out_features, f.in_features) == shape, name
        assert torch.equal(f.fastfourierft_coefficients["default"], s.fourierft_spectrum["default"].detach()), name
        assert f.fastfourierft_coefficients["default"].shape == (n,)
        assert torch.equal(f.fastfourierft_locations["default"].long(), s.indices["default"].long()), name
        assert f.fastfourierft_scaling["default"] == 150.0
    # different layers draw different coefficients from the global RNG (same locations where shapes agree)
    assert not torch.equal(layers[0][2].fastfourierft_coefficients["default"], layers[1][2].fastfourierft_coefficients["default"])

    batch = make_batch(case)
    ref = outputs(stock, batch)
    assert max_rel(ref, outputs(base, batch)) > 1e-3  # the random init really changes the model
    for path in ("auto", "activation", "dense"):
        for _, _, f in layers:
            f.spectral_path = path
        assert max_rel(outputs(fast, batch), ref) <= 1e-5, path


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_init_weights_true_starts_at_base(case):
    base, stock, fast = stock_and_fast(case, n_frequency=100, init_weights=True)
    for _, s, f in paired_layers(stock, fast):
        assert torch.equal(f.fastfourierft_coefficients["default"], torch.zeros(100))
        assert torch.equal(s.fourierft_spectrum["default"].detach(), torch.zeros(100))
    batch = make_batch(case)
    assert torch.equal(outputs(fast, batch), outputs(base, batch))


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_copied_spectrum_gives_same_model(case):
    _, stock, fast = stock_and_fast(case, n_frequency=300, scaling=40.0, random_loc_seed=12)
    g = torch.Generator().manual_seed(1)
    for _, s, f in paired_layers(stock, fast):
        with torch.no_grad():
            s.fourierft_spectrum["default"].copy_(torch.randn(300, generator=g) * 0.3)
            f.fastfourierft_coefficients["default"].copy_(s.fourierft_spectrum["default"])
        assert f.fastfourierft_coefficients["default"].dtype == torch.float32
        # the dense update is stock's
        torch.testing.assert_close(f.get_delta_weight("default"), s.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    for seed in range(2):
        batch = make_batch(case, seed)
        assert max_rel(outputs(fast, batch), outputs(stock, batch)) <= 1e-5


@pytest.mark.parametrize("case", ["bert", "gpt2"])
@pytest.mark.parametrize("path", ["activation", "dense"])
def test_coefficient_gradient_equals_stock(case, path):
    _, stock, fast = stock_and_fast(case, n_frequency=200, seed=9)
    layers = paired_layers(stock, fast)
    for _, _, f in layers:
        f.spectral_path = path
    batch = make_batch(case, 3)
    stock.train()
    fast.train()
    # no dropout, so both see the same function
    for model in (stock, fast):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    stock(**batch).loss.backward()
    fast(**batch).loss.backward()
    for name, s, f in layers:
        gs = s.fourierft_spectrum["default"].grad
        gf = f.fastfourierft_coefficients["default"].grad
        assert gs is not None and gf is not None
        assert float(gs.abs().max()) > 0
        assert float((gf - gs).abs().max()) <= 1e-5 * max(float(gs.abs().max()), 1.0), name
    # only the coefficients (and no base weight) take gradients
    trainable = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert trainable and all(".fastfourierft_coefficients." in n for n in trainable)


# --------------------------------------------------------------------------------------------------------------
# save / load and merge


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_save_load_round_trip(case, tmp_path):
    build = CASES[case][0]
    _, _, fast = stock_and_fast(case, n_frequency=150, random_loc_seed=3)
    batch = make_batch(case)
    out = outputs(fast, batch)
    fast.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    n_layers = len(paired_layers(*stock_and_fast(case, n_frequency=1)[1:]))
    assert len([k for k in saved if "fastfourierft_coefficients" in k]) == n_layers
    # locations are re-drawn from the seed, as stock does, so they are not stored
    assert not any("fastfourierft_locations" in k for k in saved)
    loaded = PeftModel.from_pretrained(build(0), tmp_path).eval()
    assert loaded.peft_config["default"].random_loc_seed == 3
    assert float((outputs(loaded, batch) - out).abs().max()) <= 1e-6
    loaded_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, FastFourierFTLinear)}
    for name, layer in ((n, m) for n, m in fast.named_modules() if isinstance(m, FastFourierFTLinear)):
        assert torch.equal(loaded_layers[name].fastfourierft_locations["default"], layer.fastfourierft_locations["default"])


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_merge_equals_unmerged_and_stock_merge(case):
    base, stock, fast = stock_and_fast(case, n_frequency=200, scaling=20.0)
    batch = make_batch(case)
    out = outputs(fast, batch)
    assert max_rel(out, outputs(base, batch)) > 1e-3
    with fast.disable_adapter():
        assert torch.equal(outputs(fast, batch), outputs(base, batch))
    fast.merge_adapter()
    assert max_rel(outputs(fast, batch), out) <= 1e-5
    fast.merge_adapter()  # merging again is a no-op (with a warning), not a second merge
    assert max_rel(outputs(fast, batch), out) <= 1e-5
    fast.unmerge_adapter()
    assert max_rel(outputs(fast, batch), out) <= 1e-5
    with fast.disable_adapter():  # after merge/unmerge the base weights are back up to rounding
        assert max_rel(outputs(fast, batch), outputs(base, batch)) <= 1e-5
    merged_fast = fast.merge_and_unload()
    merged_stock = stock.merge_and_unload()
    assert not any(isinstance(m, FastFourierFTLinear) for m in merged_fast.modules())
    assert max_rel(outputs(merged_fast, batch), out) <= 1e-5
    stock_state = merged_stock.state_dict()
    for key, value in merged_fast.state_dict().items():
        torch.testing.assert_close(value, stock_state[key], atol=1e-6, rtol=1e-5, msg=key)
