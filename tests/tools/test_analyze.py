"""`spectral-peft analyze`: the report on tiny models (tuned and adapter), and bad inputs (one clear error line, exit
code 2). The measures it reports are tested in tests/test_analysis.py."""

from __future__ import annotations

import json

import pytest
import torch

from spectral_peft.tools.analyze_report import layer_type
from spectral_peft_cli import main

from .cli_support import bad_input, examples, make_tiny_bert, make_tiny_gpt2, make_tokenizer, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_types():
    assert layer_type("bert.encoder.layer.3.attention.self.query") == "attention.self.query"
    assert layer_type("bert.pooler.dense") == "bert.pooler.dense"
    assert layer_type("model.layers.10.mlp.up_proj") == "mlp.up_proj"


# ---------------------------------------------------------------------------------------------------------------
# the command on tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base, a 'fully tuned' copy with query and value changed, a CSV task and a LoCA adapter."""
    from peft import get_peft_model
    from transformers import BertForSequenceClassification

    import spectral_peft

    root = tmp_path_factory.mktemp("analyze")
    base = make_tiny_bert(root / "base")
    torch.manual_seed(0)
    tuned = BertForSequenceClassification.from_pretrained(base, num_labels=3)
    changes = {}
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.endswith(("query", "value")):
                change = 0.01 * torch.randn_like(module.weight)
                module.weight += change
                changes[name] = change
    tuned.save_pretrained(root / "tuned")
    task = write_csv(root / "task.csv", examples(per_label=8))
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base, num_labels=3),
                           spectral_peft.LocaConfig(target_modules=["query"], n_frequency=16, location_seed=5,
                                                    modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "loca_coefficients" in name:
                param.copy_(torch.randn_like(param))
    model.save_pretrained(root / "loca")
    return {"root": root, "base": str(base), "tuned": str(root / "tuned"), "task": str(task),
            "adapter": str(root / "loca"), "changes": changes}


FAST = ["--max-length", "16", "--batch-size", "4", "--prior-batches", "2", "--threads", "1", "--quiet"]


def test_report_of_a_tuned_model(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["analyze", "--base", tiny["base"], "--tuned", tiny["tuned"], "--task", tiny["task"], *FAST,
                 "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((out / "analysis.json").read_text())
    # exactly the changed matrices (the head is a fresh initialisation in the base, so it is left out)
    assert {r["name"] for r in result["matrices"]} == set(tiny["changes"])
    for record in result["matrices"]:
        assert record["norm"] == pytest.approx(float(tiny["changes"][record["name"]].norm()), rel=1e-4)
        assert record["type"] in ("attention.self.query", "attention.self.value")
        assert set(record["energy"]["dct"]) == {"original", "random", "self", "prior"}
        assert record["errors"][0]["rank"] == 1 and record["errors"][0]["budget"] == 64
        assert -1 <= record["prior_cosine"] <= 1
    assert list(result["summary"]) == ["attention.self.query", "attention.self.value", "all"]
    assert result["settings"]["prior"] == "gradient" and result["settings"]["max_length"] == 16
    report = (out / "analysis.md").read_text()
    assert "## Approximation error at equal parameter budgets" in report and "Relative Frobenius error" in report
    assert "bert.encoder.layer.1.attention.self.value" in report
    for plot in ("energy.png", "errors.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_target_modules_and_no_prior(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["analyze", "--base", tiny["base"], "--tuned", tiny["tuned"], "--target-modules", "value",
                 "--prior", "none", "--quiet", "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((out / "analysis.json").read_text())
    assert [r["name"].rsplit(".", 1)[-1] for r in result["matrices"]] == ["value", "value"]
    assert all("prior" not in r["energy"]["dct"] and r["prior_cosine"] is None for r in result["matrices"])


def test_a_users_own_pair_of_classifiers_needs_no_task_and_no_label_count(tiny, tmp_path, capsys):
    # two BertForSequenceClassification checkpoints with 3 labels, neither from finetune (no run.json): their
    # weights are compared as saved, with no data (the gradient prior needs a task, and none is known)
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(tiny["base"], num_labels=3)
    base.save_pretrained(tmp_path / "base")
    make_tokenizer(tmp_path / "base")
    out = tmp_path / "report"
    code = main(["analyze", "--base", str(tmp_path / "base"), "--tuned", tiny["tuned"], "--quiet", "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((out / "analysis.json").read_text())
    assert result["settings"]["prior"] == "none"
    assert {r["name"] for r in result["matrices"]} == set(tiny["changes"])
    # with a task the gradient prior is computed too
    code = main(["analyze", "--base", str(tmp_path / "base"), "--tuned", tiny["tuned"], "--task", tiny["task"],
                 *FAST, "--output", str(tmp_path / "with-prior")])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads((tmp_path / "with-prior" / "analysis.json").read_text())["settings"]["prior"] == "gradient"


def test_an_adapter_alone_and_against_the_tuned_model(tiny, tmp_path, capsys):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    out = tmp_path / "adapter"
    code = main(["analyze", "--base", tiny["base"], "--adapter", tiny["adapter"], "--prior", "none", "--quiet",
                 "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((out / "analysis.json").read_text())
    model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(tiny["base"], num_labels=3),
                                      tiny["adapter"])
    names = [r["name"] for r in result["matrices"]]
    assert names == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    for record in result["matrices"]:
        dw = model.base_model.model.get_submodule(record["name"]).get_delta_weight("default")
        assert record["norm"] == pytest.approx(float(dw.norm()), rel=1e-5)
        # 16 DCT atoms: the 16 top coefficients (top 10% of 1024 entries and more) hold everything
        assert record["energy"]["dct"]["original"][-1] == pytest.approx(1.0)
    assert result["inputs"]["adapter_type"] == "LOCA"

    out = tmp_path / "both"
    code = main(["analyze", "--base", tiny["base"], "--tuned", tiny["tuned"], "--adapter", tiny["adapter"],
                 "--prior", "none", "--quiet", "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((out / "analysis.json").read_text())
    located = {r["name"]: r["locations"] for r in result["matrices"] if r.get("locations")}
    assert set(located) == set(names)
    for loc in located.values():
        assert loc["n"] == 16 and 0 <= loc["overlap"] <= 1 and loc["energy_share"] <= loc["top_n_energy_share"]
        assert loc["moved"] == 0.0  # never trained: still on the initial cells
    assert "## Adapter locations against the full fine-tuning dW" in (out / "analysis.md").read_text()


def test_a_decoder_with_conv1d_weights_tuned_and_with_a_lora_adapter(tmp_path, capsys):
    """GPT-2 stores c_attn as Conv1D (in x out): dW, the prior and a LoRA adapter's dW all come out as out x in."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    from .cli_support import write_text

    base = make_tiny_gpt2(tmp_path / "gpt2")
    tuned = GPT2LMHeadModel.from_pretrained(base)
    change = 0.01 * torch.randn(32, 96)
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight += change
    tuned.save_pretrained(tmp_path / "tuned")
    code = main([str(a) for a in ["analyze", "--base", base, "--tuned", tmp_path / "tuned", "--task",
                                  write_text(tmp_path / "t.txt"), *FAST, "--output", tmp_path / "out"]])
    _, err = capsys.readouterr()
    assert code == 0, err
    (record,) = json.loads((tmp_path / "out" / "analysis.json").read_text())["matrices"]
    assert record["name"] == "transformer.h.0.attn.c_attn" and record["shape"] == [96, 32]
    assert record["norm"] == pytest.approx(float(change.norm()), rel=1e-4) and record["prior_cosine"] is not None

    lora = get_peft_model(GPT2LMHeadModel.from_pretrained(base),
                          LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    code = main([str(a) for a in ["analyze", "--base", base, "--adapter", tmp_path / "lora", "--prior", "none",
                                  "--quiet", "--output", tmp_path / "lora-out"]])
    _, err = capsys.readouterr()
    assert code == 0, err
    records = json.loads((tmp_path / "lora-out" / "analysis.json").read_text())["matrices"]
    assert [r["shape"] for r in records] == [[96, 32], [96, 32]]
    for record in records:
        layer = lora.base_model.model.get_submodule(record["name"])
        expected = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert record["norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
        assert record["errors"][1]["svd"] == pytest.approx(0.0, abs=1e-5)  # rank 2: exact at r = 2


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def test_base_and_tuned_of_different_architectures(tiny, tmp_path, capsys):
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2")
    bad_input(capsys, ["analyze", "--base", tiny["base"], "--tuned", gpt2, "--prior", "none", "--output",
                       tmp_path / "o"], None, "is a gpt2 model but --base is a bert: different architectures")
    assert not (tmp_path / "o").exists()


def test_base_and_tuned_of_different_sizes(tiny, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=27, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path / "wide")
    bad_input(capsys, ["analyze", "--base", tiny["base"], "--tuned", tmp_path / "wide", "--prior", "none",
                       "--output", tmp_path / "o"], None, "different architectures")


def test_an_adapter_for_another_base(tiny, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from .cli_support import make_tokenizer

    config = BertConfig(vocab_size=27, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path / "other")
    make_tokenizer(tmp_path / "other")
    bad_input(capsys, ["analyze", "--base", tmp_path / "other", "--adapter", tiny["adapter"], "--prior", "none",
                       "--output", tmp_path / "o"], None, f"--adapter {tiny['adapter']} does not fit --base")


@pytest.mark.parametrize("extra, message", [
    ([], "give --tuned (a fully fine-tuned model) or --adapter"),
    (["--adapter", "/nonexistent/adapter"], "--adapter folder not found: /nonexistent/adapter"),
    (["--adapter", "TUNED"], "has no adapter_config.json; it is not a PEFT adapter folder (it holds a whole model"),
    (["--tuned", "TUNED", "--target-modules", "nothing_like_this"], "'nothing_like_this' matches no Linear module"),
    (["--tuned", "BASE"], "no Linear weight differs between --base and --tuned"),
    (["--tuned", "ADAPTER"], "--tuned: model folder '"),
    (["--tuned", "ADAPTER"], "(it holds a PEFT adapter: pass it as --adapter)"),
    (["--tuned", "TUNED", "--prior-batches", "0"], "--prior-batches must be positive"),
    (["--tuned", "TUNED", "--adapter", "ADAPTER", "--target-modules", "value"],
     "is not among the analysed changes of --tuned"),
])
def test_bad_arguments(tiny, tmp_path, capsys, extra, message):
    names = {"TUNED": tiny["tuned"], "BASE": tiny["base"], "ADAPTER": tiny["adapter"]}
    extra = [names.get(a, a) for a in extra]
    bad_input(capsys, ["analyze", "--base", tiny["base"], *extra, "--prior", "none", "--output", tmp_path / "o"],
              None, message)


def test_an_output_folder_with_other_files_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    bad_input(capsys, ["analyze", "--base", tiny["base"], "--tuned", tiny["tuned"], "--prior", "none", "--output",
                       tmp_path / "o"], None, "is not empty and holds no earlier analysis")
