"""Hostile adapter folders through the public API, and interrupted saves.

Each broken folder must fail at load with an error naming the file and the field, and leave the user's model as it
was (``PeftModel.from_pretrained`` wraps modules in place; a failure must unwrap them). Run for LoCA, S2FT and
fast FourierFT on tiny random BERTs. docs/reliability.md lists the cases with the messages they give.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft.peft_model
import safetensors.torch

import spectral_peft.adapter_files as adapter_files
from spectral_peft.adapter_files import tensor_checksum
from spectral_peft.layer import SpectralLinear

from .conftest import build_bert, make_input_ids, rewrite_adapter_weights
from .test_model import CONFIGS, logits, module_types, trained

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY0 = "bert.encoder.layer.0.attention.self.query"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def edit_config(**changes):
    def edit(folder, prefix):
        path = folder / CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def edit_bytes(change):
    def edit(folder, prefix):
        path = folder / WEIGHTS
        path.write_bytes(change(bytearray(path.read_bytes())))
    return edit


def flip(data: bytearray, at: int) -> bytes:
    data[at] ^= 0xFF
    return bytes(data)


def edit_tensor(part: str, change, keep_checksum: bool = False):
    """Rewrite one tensor of query 0 (or any key ending with ``part``) with safetensors' own writer, as another tool
    would, which drops the weights_checksum the config recorded (unless ``keep_checksum``: an edit behind the
    config's back)."""
    def edit(folder, prefix):
        path = folder / WEIGHTS
        tensors = load_file(str(path))
        suffix = part.format(p=prefix)
        key = next(k for k in sorted(tensors) if k.endswith(suffix) and (QUERY0 in k or "classifier" in part))
        tensors[key] = change(tensors[key].clone())
        if keep_checksum:
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            rewrite_adapter_weights(folder, tensors)
    return edit


def put(index, value):
    def change(tensor):
        tensor[index] = value
        return tensor
    return change


def repeat_first_cell(cells):
    cells[:, 1] = cells[:, 0]
    return cells


def other_type(method):
    return {"loca": "S2FT", "s2ft": "LOCA", "fastfourierft": "LOCA"}[method]


def config_of_another_method(folder, prefix):
    # a complete, valid config of another of our methods over this method's tensors
    other = {"LOCA": "loca", "S2FT": "s2ft"}[other_type(prefix[:-1])]
    CONFIGS[other](target_modules=["query", "value"], n_frequency=16, modules_to_save=["classifier"]).save_pretrained(folder)


# (case, methods it applies to, edit(folder, prefix), file the error names, pattern after the file name);
# "{p}" in a tensor part or pattern is the method's prefix
CASES = [
    ("truncated", None, edit_bytes(lambda d: bytes(d[: len(d) // 2])), WEIGHTS, "cannot be read, the file is truncated or corrupt"),
    ("empty", None, edit_bytes(lambda d: b""), WEIGHTS, "cannot be read.*header too small"),
    ("byte flipped in header", None, edit_bytes(lambda d: flip(d, 20)), WEIGHTS, "cannot be read"),
    ("byte flipped in a tensor", None, edit_bytes(lambda d: flip(d, len(d) - 7)), WEIGHTS,
     "do not match the weights_checksum that adapter_config.json recorded"),
    ("tensor rewritten, config unchanged", None, edit_tensor("{p}coefficients", put(0, 1.0), keep_checksum=True),
     WEIGHTS, "do not match the weights_checksum"),
    ("weights missing", None, lambda f, p: (f / WEIGHTS).unlink(), "", "no adapter_model.safetensors"),
    ("coefficients of another size", None, edit_tensor("{p}coefficients", lambda t: torch.zeros(t.numel() + 1)),
     WEIGHTS, rf"'{QUERY0}'.*{{p}}coefficients has shape \(17,\), expected \(16,\)"),
    ("integer coefficients", None, edit_tensor("{p}coefficients", lambda t: t.long()),
     WEIGHTS, rf"'{QUERY0}'.*{{p}}coefficients has dtype torch.int64, expected float"),
    ("NaN coefficient", None, edit_tensor("{p}coefficients", put(3, float("nan"))),
     WEIGHTS, rf"'{QUERY0}'.*{{p}}coefficients contains NaN or Inf"),
    ("Inf coefficient", None, edit_tensor("{p}coefficients", put(0, float("-inf"))),
     WEIGHTS, rf"'{QUERY0}'.*{{p}}coefficients contains NaN or Inf"),
    ("head of another shape", None, edit_tensor("classifier.weight", lambda t: torch.zeros(4, 32)),
     WEIGHTS, r"classifier.weight has shape \(4, 32\), the model's is \(3, 32\)"),
    ("location outside the matrix", ("loca", "s2ft"), edit_tensor("{p}locations", put((0, 2), 40)),
     WEIGHTS, rf"'{QUERY0}'.*{{p}}locations: locations fall outside the 32 x 32 matrix"),
    ("duplicated location", ("loca", "s2ft"), edit_tensor("{p}locations", repeat_first_cell),
     WEIGHTS, rf"'{QUERY0}'.*{{p}}locations: 1 locations share a cell"),
    ("integer LoCA locations", ("loca",), edit_tensor("{p}locations", lambda t: t.long()),
     WEIGHTS, r"loca_locations has dtype torch.int64, expected float"),
    ("row order not a permutation", ("s2ft",), edit_tensor("s2ft_row_order", put(0, 1)),
     WEIGHTS, rf"'{QUERY0}'.*s2ft_row_order: not a permutation"),
    ("float column order", ("s2ft",), edit_tensor("s2ft_col_order", lambda t: t.float()),
     WEIGHTS, rf"'{QUERY0}'.*s2ft_col_order: expected integer indices"),
    ("unknown field", None, edit_config(n_frequncy=16), CONFIG, r"Config has no field 'n_frequncy'"),
    ("n_frequency not a number", None, edit_config(n_frequency="abc"), CONFIG,
     r"Config\.n_frequency must be a positive integer, got 'abc'"),
    ("scaling null", None, edit_config(scaling=None), CONFIG, r"Config\.scaling must be a number, got None"),
    ("fan_in_fan_out a string", None, edit_config(fan_in_fan_out="no"), CONFIG,
     r"Config\.fan_in_fan_out must be true or false, got 'no'"),
    ("target_modules a number", None, edit_config(target_modules=5), CONFIG, r"Config\.target_modules must be"),
    ("n_frequency not the file's", None, edit_config(n_frequency=17), WEIGHTS,
     rf"'{QUERY0}'.*{{p}}coefficients has shape \(16,\), expected \(17,\)"),
    ("target_modules not the file's", None, edit_config(target_modules=["query"]), WEIGHTS,
     r"holds {p}\w+ for 'bert\.encoder\.layer\.\d\.attention\.self\.value', which the adapter's target_modules"),
    ("another method's peft_type", None, lambda f, p: edit_config(peft_type=other_type(p[:-1]))(f, p), CONFIG,
     r"has no field .*is this another method's adapter\?"),
    ("another method's config", None, config_of_another_method, WEIGHTS,
     r"holds {p} tensors but .*adapter_config.json says peft_type '(LOCA|S2FT)'"),
]


def cases() -> list:
    return [pytest.param(method, edit, file, pattern, id=f"{method}-{name}")
            for name, methods, edit, file, pattern in CASES for method in CONFIGS if methods is None or method in methods]


@pytest.fixture
def saved(tmp_path):
    def save(method):
        folder = tmp_path / method
        trained(method).save_pretrained(folder)
        return folder
    return save


def requires_grad(model) -> dict:
    return {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("method, edit, file, pattern", cases())
def test_a_broken_adapter_folder_is_refused_and_the_base_model_is_left_as_it_was(saved, method, edit, file, pattern):
    folder = saved(method)
    prefix = method + "_"
    edit(folder, prefix)
    base = build_bert(0)
    ids = make_input_ids()
    before, grads, expected = module_types(base), requires_grad(base), logits(base, ids)
    named = re.escape(str(folder / file) if file else str(folder))
    with pytest.raises((ValueError, FileNotFoundError), match=f"{named}.*{pattern.format(p=prefix)}"):
        PeftModel.from_pretrained(base, folder)
    assert module_types(base) == before
    assert not any(isinstance(m, SpectralLinear) for m in base.modules())
    assert requires_grad(base) == grads and not hasattr(base, "peft_config")
    assert torch.equal(logits(base, ids), expected)


@pytest.mark.parametrize("method, edit, file, pattern", [
    p for p in cases() if any(s in p.id for s in ("truncated", "tensor", "NaN", "unknown field", "peft_type", "duplicated"))
])
def test_a_broken_adapter_folder_given_to_load_adapter_changes_nothing(saved, method, edit, file, pattern):
    folder = saved(method)
    edit(folder, method + "_")
    model = trained(method)
    ids = make_input_ids()
    state, expected = {k: v.clone() for k, v in model.state_dict().items()}, logits(model, ids)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(folder / file))):
        model.load_adapter(str(folder), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("method", CONFIGS)
def test_a_saved_config_records_the_checksum_of_its_weights_and_loads(saved, method):
    folder = saved(method)
    recorded = json.loads((folder / CONFIG).read_text())["weights_checksum"]
    assert recorded == tensor_checksum(load_file(str(folder / WEIGHTS)))
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    ids = make_input_ids()
    assert torch.equal(logits(PeftModel.from_pretrained(build_bert(0), folder), ids), logits(trained(method), ids))


def test_importing_the_package_replaces_no_function_of_another_library():
    # saving and loading go through PEFT's own functions; ours only add to what PEFT calls (the config's methods)
    assert peft.peft_model.safe_save_file is safetensors.torch.save_file
    assert peft.utils.save_and_load.safe_load_file is safetensors.torch.load_file


def test_other_methods_are_saved_as_stock_peft_saves_them(tmp_path):
    get_peft_model(build_bert(0), LoraConfig(target_modules=["query"], r=2)).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert "weights_checksum" not in json.loads((tmp_path / CONFIG).read_text())


def _crash_writing_weights(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")  # the start of a header, then the process dies
    raise KeyboardInterrupt


def _crash_renaming(src, dst):
    raise KeyboardInterrupt


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("crash", ["writing the weights", "renaming the config"])
def test_an_interrupted_save_leaves_nothing_that_loads_silently(saved, method, crash, monkeypatch):
    # PEFT writes the weights in place: an interrupted save loses the previous adapter, and what it leaves is
    # refused at load with an error naming the file, never loaded as another model
    folder = saved(method)
    config = (folder / CONFIG).read_bytes()
    retrained = trained(method, seed=5)
    if crash == "writing the weights":
        monkeypatch.setattr(peft.peft_model, "safe_save_file", _crash_writing_weights)
    else:
        monkeypatch.setattr(adapter_files.os, "replace", lambda src, dst: _crash_renaming(src, dst)
                            if dst.endswith(CONFIG) else adapter_files.os.rename(src, dst))
    with pytest.raises(KeyboardInterrupt):
        retrained.save_pretrained(folder)
    monkeypatch.undo()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert (folder / CONFIG).read_bytes() == config  # the config is renamed into place or not at all
    refused = "cannot be read" if crash == "writing the weights" else "the tensors do not match the weights_checksum"
    with pytest.raises(ValueError, match=re.escape(str(folder / WEIGHTS)) + ": " + refused):
        PeftModel.from_pretrained(build_bert(0), folder)


@pytest.mark.parametrize("method", CONFIGS)
def test_an_interrupted_first_save_leaves_nothing_that_loads(tmp_path, method, monkeypatch):
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _crash_writing_weights)
    with pytest.raises(KeyboardInterrupt):
        trained(method).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / CONFIG).exists()
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(build_bert(0), tmp_path)
