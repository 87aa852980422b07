"""The three methods inside the tools PEFT users combine them with, tried through the public API on tiny models:
torch.compile, gradient checkpointing, Trainer with gradient accumulation, TRL's SFTTrainer, merging and reloading
with plain transformers, inference_mode before training, meta-device and low_cpu_mem_usage loading, dtype moves,
PEFT's own code paths that read ``peft_type``, ``init_weights`` and ``add_weighted_adapter``. The distributed rows
(DDP, accelerate, FSDP2) are in ``tests/distributed``. docs/reliability.md has the table."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import spectral_peft
from spectral_peft.layer import SpectralLinear

from .conftest import build_bert, build_llama, make_input_ids

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["loca", "s2ft", "fastfourierft"]
TARGETS = ["q_proj", "v_proj"]


def config(method: str, **overrides):
    """A method's config on the tiny Llama's attention; LoCA with a short schedule that reaches location phases."""
    kwargs = dict(target_modules=TARGETS, n_frequency=40, init_weights=False)
    if method == "loca":
        kwargs.update(coefficient_steps=1, location_steps=2, location_learning_steps=5, location_seed=0)
    kwargs.update(overrides)
    return {"loca": spectral_peft.LocaConfig, "s2ft": spectral_peft.S2FTConfig,
            "fastfourierft": spectral_peft.FastFourierFTConfig}[method](**kwargs)


def layers(model) -> list[SpectralLinear]:
    return [m for m in model.modules() if isinstance(m, SpectralLinear)]


def batch(step: int, vocab: int = 100) -> dict:
    ids = make_input_ids(2, 8, seed=step, vocab=vocab)
    return {"input_ids": ids, "labels": ids}


def train(model, method: str, steps: int = 6, forward=None) -> list[float]:
    """``steps`` Adam steps (LoCA with its schedule); the losses."""
    forward = model if forward is None else forward
    if method == "loca":
        groups = spectral_peft.loca_param_groups(model, lr=1e-2, location_lr=0.5)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}]
    optimizer = torch.optim.Adam(groups)
    schedule = spectral_peft.LocaSchedule(model) if method == "loca" else None
    losses = []
    for step in range(steps):
        loss = forward(**batch(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
    return losses


def cells(model) -> list[torch.Tensor]:
    return [layer.spectrum("default").cells.clone() for layer in layers(model)]


# ----------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("method", METHODS)
def test_torch_compile_trains_like_eager_without_graph_breaks(method):
    # LoCA through coefficient and location phases; the graph breaks dynamo counts over the whole run
    model = get_peft_model(build_llama(), config(method))
    eager = copy.deepcopy(model)
    counters.clear()
    compiled = train(model, method, forward=torch.compile(model, backend="aot_eager"))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert compiled == pytest.approx(train(eager, method), rel=1e-5)
    for mine, theirs in zip(cells(model), cells(eager)):
        assert torch.equal(mine, theirs)
    if method == "loca":  # locations learned under compile
        initial = [layer.initial_cells("default", 40, model.peft_config["default"]) for layer in layers(model)]
        assert any((c != i).any() for c, i in zip(cells(model), initial))


def test_torch_compile_with_inductor_matches_eager():
    model = get_peft_model(build_llama(), config("loca"))
    eager = copy.deepcopy(model)
    compiled = train(model, "loca", forward=torch.compile(model))
    assert compiled == pytest.approx(train(eager, "loca"), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# gradient checkpointing


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_pass(method, reentrant):
    def gradients(checkpointing: bool) -> dict:
        base = build_llama()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = get_peft_model(base, config(method))
        model.train()
        if method == "loca":  # a location phase: the location gradients too
            for layer in layers(model):
                layer.set_phase("default", True, True)
        model(**batch(0)).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any(g.abs().max() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Trainer and TRL


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = make_input_ids(1, 8, seed=100 + i)[0]
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("method", METHODS)
def test_trainer_with_gradient_accumulation_trains_and_saves(method, tmp_path):
    base = build_llama()
    if method == "s2ft":
        model = spectral_peft.prepare_s2ft(base, config(method, prior="gradient", prior_batches=1), [batch(-1)])
    else:
        model = get_peft_model(base, config(method))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "coefficients" in n}
    callbacks = [spectral_peft.LocaCallback()] if method == "loca" else []
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks).train()
    after = {n: p.detach() for n, p in model.named_parameters() if "coefficients" in n}
    assert all(not torch.equal(before[n], after[n]) for n in before)
    if method == "loca":
        assert callbacks[0].schedule.step_count == 6  # optimizer steps, not the 12 forward passes
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch(7)).logits, model.eval()(**batch(7)).logits)


@pytest.mark.parametrize("method", METHODS)
def test_trl_sft_trainer_takes_each_config_as_peft_config(method, tmp_path, minilm_path):
    # optional: runs where trl is installed (make install puts it in the test environment)
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)  # any tokenizer that works offline
    tokenizer.eos_token = tokenizer.sep_token  # a BERT tokenizer has no end-of-text token of its own
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    texts = [f"sample {i}: the quick brown fox jumps over the lazy dog {i % 5}" for i in range(16)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", max_length=32)
    trainer = trl.SFTTrainer(model=base, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer, peft_config=config(method, init_weights=True),
                             callbacks=[spectral_peft.LocaCallback()] if method == "loca" else None)
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].peft_type == method.upper()
    trainer.train()
    assert all(layer._container("coefficients")["default"].abs().max() > 0 for layer in layers(trainer.model))


# ----------------------------------------------------------------------------------------------------------------
# merging, loading, moving


@pytest.mark.parametrize("method", METHODS)
def test_merged_model_reloads_in_plain_transformers_with_the_same_outputs(method, tmp_path):
    model = get_peft_model(build_llama(), config(method)).eval()
    with torch.no_grad():
        expected = model(**batch(3)).logits
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, SpectralLinear) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch(3)).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["auto", "activation", "factored"])
@pytest.mark.parametrize("method", METHODS)
def test_a_pass_under_inference_mode_leaves_training_working_for_every_model(method, path):
    # evaluation under inference_mode and then more training is an everyday pattern, also on another model
    first = get_peft_model(build_llama(), config(method))
    for layer in layers(first):
        layer.spectral_path = path
    with torch.inference_mode():
        first(**batch(0))
    for model in (first, get_peft_model(build_llama(1), config(method))):
        for layer in layers(model):
            layer.spectral_path = path
        model(**batch(1)).loss.backward()
        assert all(layer._container("coefficients")["default"].grad.abs().max() > 0 for layer in layers(model))


@pytest.mark.parametrize("method", METHODS)
def test_low_cpu_mem_usage_loading_gives_the_saved_model(method, tmp_path):
    model = get_peft_model(build_llama(), config(method)).eval()
    if method == "s2ft":  # orders that are not the identity
        for layer in layers(model):
            layer.set_orders("default", torch.randperm(layer.out_features), torch.randperm(layer.in_features))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**batch(2)).logits
    loaded = PeftModel.from_pretrained(build_llama(), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(t.is_meta for t in loaded.state_dict().values())
    again = get_peft_model(build_llama(), config(method, init_weights=True))
    again.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    again.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch(2)).logits, expected)
        torch.testing.assert_close(again.eval()(**batch(2)).logits, expected)


class _MLP(torch.nn.Module):
    """Only persistent state, so that load_state_dict restores all of it (transformers models keep some buffers,
    such as rotary frequencies, out of their state dict)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = torch.nn.Linear(48, 40), torch.nn.Linear(40, 8)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


@pytest.mark.parametrize("method", METHODS)
def test_moved_to_meta_and_materialised_then_loaded_gives_the_same_model(method):
    # the deferred-initialisation pattern (FSDP, init on meta): to("meta"), to_empty(), load_state_dict()
    model = get_peft_model(_MLP(), config(method)).eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(5, 48)
    with torch.no_grad():
        expected = model(x)
    model.to("meta")
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_moves_keep_loca_locations_float32_and_saved_as_computed(dtype, tmp_path):
    # a 1024-wide layer: bf16 holds integers exactly only up to 256, fp16 up to 2048
    wide = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    model = get_peft_model(wide, spectral_peft.LocaConfig(target_modules=["0"], n_frequency=64, location_seed=0))
    (layer,) = layers(model)
    model.to(dtype)
    assert layer.loca_locations["default"].dtype == torch.float32
    assert layer.loca_coefficients["default"].dtype == dtype
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    locations = saved["base_model.model.0.loca_locations"]
    assert locations.dtype == torch.float32
    assert torch.equal(locations.long(), layer.loca_cells["default"].cpu())
    model.float()
    assert torch.equal(layer.loca_locations["default"].long(), layer.loca_cells["default"])


# ----------------------------------------------------------------------------------------------------------------
# PEFT's own code paths


@pytest.mark.parametrize("method", METHODS)
def test_peft_type_reads_like_peft_own_types(method, tmp_path):
    cfg = config(method)
    assert cfg.peft_type == method.upper() and cfg.peft_type.value == method.upper()
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(build_llama(), cfg, mixed=True)
    model = get_peft_model(build_llama(), cfg)
    model.save_pretrained(tmp_path)  # writes PEFT's model card, which reads peft_type.value
    assert "library_name: peft" in (tmp_path / "README.md").read_text()
    assert PeftConfig.from_pretrained(tmp_path).peft_type.value == method.upper()


@pytest.mark.parametrize("method", METHODS)
def test_init_weights_true_starts_at_the_base_model_and_false_away_from_it(method):
    base = build_llama().eval()
    with torch.no_grad():
        expected = base(**batch(5)).logits
        at_base = get_peft_model(copy.deepcopy(base), config(method, init_weights=True))(**batch(5)).logits
        away = get_peft_model(copy.deepcopy(base), config(method, init_weights=False))(**batch(5)).logits
    torch.testing.assert_close(at_base, expected)
    assert (away - expected).abs().max() > 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_add_weighted_adapter_is_the_weighted_sum_of_updates_and_saves(method, tmp_path):
    model = get_peft_model(build_llama(), config(method, target_modules=["q_proj"]))
    model.add_adapter("other", config(method, target_modules=["q_proj", "v_proj"], n_frequency=60, scaling=2.0))
    model.add_weighted_adapter(["default", "other"], [0.5, -1.5], "mix")
    for layer in layers(model):
        parts = [(name, w) for name, w in (("default", 0.5), ("other", -1.5)) if name in layer._container("coefficients")]
        expected = sum(w * layer.get_delta_weight(name) for name, w in parts)
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=1e-5)
    assert model.active_adapters == ["default"]  # added, not switched to
    model.set_adapter("mix")
    with torch.no_grad():
        expected = model.eval()(**batch(6)).logits
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    reloaded = PeftModel.from_pretrained(build_llama(), tmp_path / "mix").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch(6)).logits, expected)


def test_add_weighted_adapter_refuses_what_cannot_be_added():
    model = get_peft_model(build_llama(), config("s2ft"))
    model.add_adapter("other", config("s2ft"))
    for layer in layers(model):
        layer.set_orders("other", torch.randperm(layer.out_features), torch.randperm(layer.in_features))
    with pytest.raises(ValueError, match="order its rows and columns differently"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="combination_type must be 'linear'"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="svd")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "mix")
    assert "mix" not in model.peft_config
    fourier = get_peft_model(build_llama(), config("fastfourierft"))
    fourier.add_adapter("other", config("fastfourierft", random_loc_seed=1))
    with pytest.raises(ValueError, match="random_loc_seed differ"):
        fourier.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    heads = get_peft_model(build_bert(), spectral_peft.LocaConfig(target_modules=["query"], n_frequency=8,
                                                                  modules_to_save=["classifier"]))
    heads.add_adapter("other", spectral_peft.LocaConfig(target_modules=["query"], n_frequency=8,
                                                        modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="modules_to_save are trained by more than one"):
        heads.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
