"""Bad configurations, targets and adapter files: each fails loudly, naming the module and/or the value."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from spectral_peft import LocaConfig
from spectral_peft.loca import LocaLinear

from ..conftest import BERT, LLAMA, make_input_ids, rewrite_adapter_weights

QUERY0 = "bert.encoder.layer.0.attention.self.query"


def loca_layers(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LocaLinear)}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------------------------------------------
# configuration values


@pytest.mark.parametrize("value", [0, -3, 1.5, 10.0, "10", None, True])
def test_n_frequency_must_be_positive_int(value):
    with pytest.raises(ValueError, match=r"n_frequency must be a positive integer, got " + repr(value).replace(".", r"\.")):
        LocaConfig(n_frequency=value, target_modules=["query"])


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_n_frequency_pattern_values_checked(value):
    with pytest.raises(ValueError, match=r"n_frequency_pattern\['query'\]"):
        LocaConfig(target_modules=["query"], n_frequency_pattern={"query": value})


@pytest.mark.parametrize("field,value", [("coefficient_steps", -1), ("location_steps", 1.5), ("location_learning_steps", -2)])
def test_schedule_fields_checked(field, value):
    with pytest.raises(ValueError, match=field):
        LocaConfig(target_modules=["query"], **{field: value})


def test_scaling_must_be_number():
    with pytest.raises(ValueError, match=r"scaling must be a number, got 'big'"):
        LocaConfig(target_modules=["query"], scaling="big")


def test_n_frequency_larger_than_matrix_names_module_and_value(tiny_bert):
    # BERT's query is 32 x 32 = 1024 entries
    with pytest.raises(ValueError, match=rf"'{QUERY0}'.*n_frequency=1025.*32 x 32 = 1024"):
        get_peft_model(tiny_bert, LocaConfig(n_frequency=1025, target_modules=["query", "value"]))


def test_n_frequency_equal_to_matrix_size_is_allowed(tiny_bert):
    model = get_peft_model(tiny_bert, LocaConfig(n_frequency=1024, target_modules=["query"]))
    for layer in loca_layers(model).values():
        cells = layer.loca_cells["default"]
        assert torch.unique(cells[0] * 32 + cells[1]).numel() == 1024


def test_n_frequency_too_large_for_non_square_module(tiny_llama):
    # q_proj is 32 x 32 (fits 600), k_proj is 16 x 32 = 512 (does not)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj'.*n_frequency=600.*16 x 32 = 512"):
        get_peft_model(tiny_llama, LocaConfig(n_frequency=600, target_modules=list(LLAMA.target_modules)))


def test_n_frequency_pattern_too_large_names_module(tiny_bert):
    with pytest.raises(ValueError, match=r"attention\.self\.value'.*n_frequency=2000"):
        get_peft_model(
            tiny_bert, LocaConfig(n_frequency=8, target_modules=["query", "value"], n_frequency_pattern={"value": 2000})
        )


# ----------------------------------------------------------------------------------------------------------------
# targets


def test_embedding_target_is_type_error(tiny_bert):
    with pytest.raises(TypeError, match=r"'bert\.embeddings\.word_embeddings' is a Embedding"):
        get_peft_model(tiny_bert, LocaConfig(n_frequency=8, target_modules=["word_embeddings"]))


def test_layernorm_target_is_type_error(tiny_bert):
    with pytest.raises(TypeError, match=r"'bert\.embeddings\.LayerNorm' is a LayerNorm"):
        get_peft_model(tiny_bert, LocaConfig(n_frequency=8, target_modules=["LayerNorm"]))


def test_unmatched_targets(tiny_bert):
    with pytest.raises(ValueError, match=r"not found in the base model"):
        get_peft_model(tiny_bert, LocaConfig(n_frequency=8, target_modules=["no_such_module"]))


# ----------------------------------------------------------------------------------------------------------------
# loading onto the wrong base


def _bert(hidden: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, num_labels=3)
    ).eval()


@pytest.mark.parametrize("hidden", [48, 16])
def test_adapter_for_other_shape_is_refused(tmp_path, hidden):
    # same parameter names, same n_frequency (so coefficient and location tensors have the same shapes)
    model = get_peft_model(_bert(32), LocaConfig(n_frequency=64, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path)
    other = _bert(hidden)
    with pytest.raises(ValueError, match=rf"'{QUERY0}'.*\(32, 32\).*\({hidden}, {hidden}\)"):
        PeftModel.from_pretrained(other, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# non-finite coefficients and merging


def _trained_bert():
    model = get_peft_model(BERT.build(0), BERT.config())
    generator = torch.Generator().manual_seed(0)
    for layer in loca_layers(model).values():
        c = layer.loca_coefficients["default"]
        c.data.copy_(torch.randn(c.shape, generator=generator) * 0.1)
    return model


def _base_weights(model):
    return {n: l.get_base_layer().weight.detach().clone() for n, l in loca_layers(model).items()}


NON_FINITE = r"(NaN|Inf|non-finite)"


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_safe_merge_with_non_finite_coefficient_changes_nothing(where, bad):
    """safe_merge refuses before any layer merges: no layer, earlier or later than the bad one, is left merged."""
    model = _trained_bert()
    ids = make_input_ids()
    weights = _base_weights(model)
    layers = loca_layers(model)
    name = list(layers)[0 if where == "first" else -1]
    layers[name].loca_coefficients["default"].data[3] = bad
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}'.*'default'.*{NON_FINITE}"):
        model.merge_adapter(safe_merge=True)
    for layer_name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, weights[layer_name]), layer_name
        assert layer.merged_adapters == [], layer_name
        assert not layer.merged
    # once fixed, the same call merges every layer and matches the unmerged output
    layers[name].loca_coefficients["default"].data[3] = 0.0
    unmerged = logits(model, ids)
    model.merge_adapter(safe_merge=True)
    assert all(layer.merged_adapters == ["default"] for layer in layers.values())
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5


def test_merge_and_unload_safe_merge_with_nan_changes_nothing():
    model = _trained_bert()
    ids = make_input_ids()
    weights = _base_weights(model)
    layers = loca_layers(model)
    name = list(layers)[-1]
    layers[name].loca_coefficients["default"].data[0] = float("nan")
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}'.*{NON_FINITE}"):
        model.merge_and_unload(safe_merge=True)
    # still a PEFT model with its LoCA layers and untouched base weights
    assert loca_layers(model).keys() == layers.keys()
    for layer_name, layer in loca_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, weights[layer_name]), layer_name
        assert not layer.merged
    with model.disable_adapter():
        assert torch.isfinite(logits(model, ids)).all()


# ----------------------------------------------------------------------------------------------------------------
# tampered adapter files


@pytest.fixture
def saved_bert_adapter(tmp_path):
    model = _trained_bert()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("layer.1.attention.self.query.loca_locations"))
    return tmp_path, path, tensors, key


def _rewrite(path, tensors):
    rewrite_adapter_weights(path.parent, tensors)


def test_untampered_file_loads(saved_bert_adapter):
    folder, _, _, _ = saved_bert_adapter
    loaded = PeftModel.from_pretrained(BERT.build(0), folder)
    assert len(loca_layers(loaded)) == 4


@pytest.mark.parametrize("cell", [(32, 0), (0, -1), (5, 40)], ids=["row-past-end", "negative-column", "column-past-end"])
def test_locations_outside_matrix(saved_bert_adapter, cell):
    message = "outside the 32 x 32 matrix"
    folder, path, tensors, key = saved_bert_adapter
    tensors[key][:, 2] = torch.tensor(cell, dtype=tensors[key].dtype)
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=rf"layer\.1\.attention\.self\.query'.*loca_locations.*{message}"):
        PeftModel.from_pretrained(BERT.build(0), folder)


def test_duplicated_locations(saved_bert_adapter):
    folder, path, tensors, key = saved_bert_adapter
    tensors[key][:, 5] = tensors[key][:, 9]
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.query'.*loca_locations.*1 locations share a cell"):
        PeftModel.from_pretrained(BERT.build(0), folder)


def test_locations_that_round_to_the_same_cell(saved_bert_adapter):
    folder, path, tensors, key = saved_bert_adapter
    tensors[key][:, 5] = tensors[key][:, 9] + 0.3
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"loca_locations.*share a cell"):
        PeftModel.from_pretrained(BERT.build(0), folder)


def test_nan_locations(saved_bert_adapter):
    folder, path, tensors, key = saved_bert_adapter
    tensors[key][1, 0] = float("nan")
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"loca_locations.*NaN or Inf"):
        PeftModel.from_pretrained(BERT.build(0), folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_coefficients_in_file(saved_bert_adapter, bad):
    folder, path, tensors, key = saved_bert_adapter
    ckey = key.replace("loca_locations", "loca_coefficients")
    tensors[ckey][7] = bad
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.query'.*loca_coefficients contains NaN or Inf"):
        PeftModel.from_pretrained(BERT.build(0), folder)


def test_locations_count_mismatch(saved_bert_adapter):
    folder, path, tensors, key = saved_bert_adapter
    tensors[key] = torch.cat([tensors[key], torch.tensor([[31.0], [31.0]])], dim=1)
    tensors[key][:, -1] = torch.tensor([0.0, 0.0])
    # make the extra cell distinct from all others
    flat = set((tensors[key][0, :-1] * 32 + tensors[key][1, :-1]).long().tolist())
    free = next(i for i in range(1024) if i not in flat)
    tensors[key][:, -1] = torch.tensor([free // 32, free % 32], dtype=torch.float32)
    _rewrite(path, tensors)
    with pytest.raises((ValueError, RuntimeError), match=r"loca_locations"):
        PeftModel.from_pretrained(BERT.build(0), folder)


def test_tampered_shape_record(saved_bert_adapter):
    folder, path, tensors, key = saved_bert_adapter
    skey = key.replace("loca_locations", "loca_shape")
    assert skey in tensors, sorted(tensors)
    tensors[skey] = torch.tensor([64, 32])
    _rewrite(path, tensors)
    with pytest.raises(ValueError, match=r"layer\.1\.attention\.self\.query'.*\(64, 32\).*\(32, 32\)"):
        PeftModel.from_pretrained(BERT.build(0), folder)
