"""`spectral-peft finetune` / `evaluate` end to end on a tiny random BERT (and GPT-2) with small files, and their bad
input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spectral_peft_cli import main

from .cli_support import (
    bad_input,
    examples,
    finetune_argv,
    make_tiny_bert,
    make_tiny_gpt2,
    write_csv,
    write_jsonl,
    write_text,
)

METHODS = ["loca", "s2ft", "fourierft", "fastfourierft", "lora", "full"]
FAST = ["--steps", "4", "--batch-size", "8", "--max-length", "16", "--eval-every", "2", "--n-frequency", "16",
        "--rank", "2", "--prior-batches", "1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {
        "bert": str(make_tiny_bert(root / "bert")),
        "gpt2": str(make_tiny_gpt2(root / "gpt2")),
        "csv": str(write_csv(root / "data.csv", examples())),
        "txt": str(write_text(root / "corpus.txt")),
        "root": root,
    }


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def finetune(capsys, files, output, method, *extra, task=None, model=None):
    return run(capsys, "finetune", "--method", method, "--model", model or files["bert"],
               "--task", task or files["csv"], *FAST, "--output", output, *extra)


@pytest.mark.parametrize("method", METHODS)
def test_finetune_writes_a_finished_run_and_evaluate_reproduces_it(capsys, files, tmp_path, method):
    output = tmp_path / method
    code, out, err = finetune(capsys, files, output, method)
    assert code == 0, err
    assert "test: accuracy" in out
    metrics = json.loads((output / "metrics.json").read_text())
    run_info = json.loads((output / "run.json").read_text())
    assert metrics["finished"] and metrics["method"] == method == run_info["method"]
    assert run_info["num_labels"] == 3 and run_info["label_names"] == ["animals", "colors", "numbers"]
    assert len(metrics["loss"]) == metrics["steps"] == 4 and all(isinstance(x, float) for x in metrics["loss"])
    assert [v["step"] for v in metrics["validation"]] == [2, 4]
    assert set(metrics["test"]) == {"accuracy", "macro_f1", "loss", "examples"}
    assert metrics["test"]["examples"] == 12  # 20 per label: 4 test each
    assert metrics["trainable_params"] > metrics["head_params"] > 0
    assert metrics["adapter_bytes"] > 0 and metrics["peak_memory_mib"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["time_per_step_s"] > 0
    if method != "full":  # PEFT adds its own head names to a sequence classifier's: the file names the head once
        assert json.loads((output / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert metrics["adapter_bytes"] == (output / weights).stat().st_size
    assert (output / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (output / "checkpoint").exists()
    assert not [p for p in output.iterdir() if p.name.endswith(".tmp")]
    if method == "loca":
        assert set(metrics["phase"]) <= {"coefficients", "locations", "final"}
        assert metrics["location_params"] == 2 * 16 * 4  # 2 floats per coefficient, query+value x 2 layers
    else:
        assert metrics["location_params"] == 0
    if method in ("loca", "s2ft", "fourierft", "fastfourierft"):
        # n_frequency per matrix on query and value of 2 layers; LoCA's locations are counted apart
        assert metrics["adapter_params"] == 16 * 4
        assert metrics["trainable_params"] == metrics["adapter_params"] + metrics["head_params"]

    code, out, err = run(capsys, "evaluate", "--adapter", output, "--threads", "1")
    assert code == 0, out + err
    assert out.count(" yes") == 3 and " NO" not in out


def test_evaluate_in_a_fresh_process(files, tmp_path, capsys):
    output = tmp_path / "s2ft"
    code, _, err = finetune(capsys, files, output, "s2ft")
    assert code == 0, err
    result = subprocess.run(
        [sys.executable, "-m", "spectral_peft", "evaluate", "--adapter", str(output), "--threads", "1"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    recorded = json.loads((output / "metrics.json").read_text())["test"]
    line = next(line for line in result.stdout.splitlines() if line.startswith("accuracy"))
    assert float(line.split()[1]) == pytest.approx(recorded["accuracy"], abs=1e-6) and line.endswith("yes")


def _final_adapter(output):
    return load_file(str(output / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["loca", "lora"])
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(capsys, files, tmp_path, method):
    # LoCA: 2 coefficient steps, 3 location steps, locations learn for the first 8 of 10 steps; stopping after
    # step 4 leaves the run in the middle of its first location phase (steps 3..5)
    options = ["--steps", "10", "--save-every", "3", "--eval-every", "4", "--lr", "0.05", "--head-lr", "0.05",
               "--loca-coefficient-steps", "2", "--loca-location-steps", "3", "--location-learning-steps", "8",
               "--location-lr", "1.5"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    code, _, err = finetune(capsys, files, whole, method, *options)
    assert code == 0, err
    code, _, err = finetune(capsys, files, parts, method, *options, "--stop-after", "4")
    assert code == 0, err
    assert "--resume" in err
    assert (parts / "checkpoint" / "state.pt").is_file() and not (parts / "metrics.json").exists()
    checkpoint = torch.load(parts / "checkpoint" / "state.pt", weights_only=False)
    assert checkpoint["step"] == 4
    if method == "loca":
        assert checkpoint["loca_schedule"] == {"step": 4}
        assert checkpoint["history"]["phase"] == ["coefficients", "coefficients", "locations", "locations"]
    code, _, err = finetune(capsys, files, parts, method, *options, "--resume")
    assert code == 0, err

    first, second = _final_adapter(whole), _final_adapter(parts)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    m1 = json.loads((whole / "metrics.json").read_text())
    m2 = json.loads((parts / "metrics.json").read_text())
    assert m1["loss"] == m2["loss"] and m1["test"] == m2["test"]
    assert [v["step"] for v in m1["validation"]] == [v["step"] for v in m2["validation"]] == [4, 8, 10]
    assert m2["resumed_from_step"] == 4
    assert m1["base"] == m2["base"] and m1["base"]["validation"]["examples"] == 6  # measured before step 1, kept
    if method == "loca":
        # the locations did move during the location phases, so the resumed run had to get them right
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        locations = [v for k, v in first.items() if "loca_locations" in k]
        assert locations
        base = AutoModelForSequenceClassification.from_pretrained(files["bert"], num_labels=3)
        fresh = PeftModel.from_pretrained(base, str(whole))  # noqa: F841  (loads: locations are valid cells)
        from spectral_peft import LocaConfig
        from peft import get_peft_model

        initial = get_peft_model(
            AutoModelForSequenceClassification.from_pretrained(files["bert"], num_labels=3),
            LocaConfig(n_frequency=16, target_modules=["query", "value"], location_seed=0),
        )
        start = {k.split("loca_locations")[0]: v for k, v in initial.state_dict().items() if "loca_locations" in k}
        end = {k.split("loca_locations")[0]: v for k, v in first.items() if "loca_locations" in k}
        moved = sum(int((start[k].round() != end[k].round()).any(0).sum()) for k in end)
        assert moved > 0


def test_resume_with_other_options_is_refused(capsys, files, tmp_path):
    output = tmp_path / "run"
    code, _, err = finetune(capsys, files, output, "lora", "--stop-after", "2")
    assert code == 0, err
    code, _, err = finetune(capsys, files, output, "lora", "--resume", "--lr", "0.5")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("spectral-peft: error: --lr is 0.5 but the checkpoint")
    assert not (output / "metrics.json").exists()
    # without --resume an unfinished run is not silently restarted
    code, _, err = finetune(capsys, files, output, "lora")
    assert code == 2 and "pass --resume" in err


def test_a_finished_run_is_not_overwritten_unless_asked(capsys, files, tmp_path):
    output = tmp_path / "run"
    assert finetune(capsys, files, output, "fastfourierft")[0] == 0
    before = (output / "metrics.json").read_text()
    code, _, err = finetune(capsys, files, output, "fastfourierft")
    assert code == 2 and "finished run" in err
    code, _, err = finetune(capsys, files, output, "fastfourierft", "--resume")
    assert code == 0 and "already finished" in err
    assert (output / "metrics.json").read_text() == before
    code, _, err = finetune(capsys, files, output, "lora", "--overwrite")
    assert code == 0, err
    assert json.loads((output / "metrics.json").read_text())["method"] == "lora"
    assert not (output / "adapter_model.safetensors").stat().st_size == 0


def test_language_modelling_on_a_text_file(capsys, files, tmp_path):
    output = tmp_path / "lm"
    code, out, err = finetune(capsys, files, output, "loca", task=files["txt"], model=files["gpt2"])
    assert code == 0, err
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["task_kind"] == "language-modeling"
    assert set(metrics["test"]) == {"perplexity", "loss", "tokens"} and metrics["test"]["perplexity"] > 1
    assert metrics["head_params"] == 0
    code, out, err = run(capsys, "evaluate", "--adapter", output, "--threads", "1")
    assert code == 0, out + err
    assert "perplexity" in out


def test_jsonl_with_integer_labels_and_a_split_column(capsys, files, tmp_path):
    rows = examples(per_label=8)
    names = sorted({r["label"] for r in rows})
    records = [{"text": r["text"], "label": names.index(r["label"]) * 10,
                "split": ["train", "train", "train", "validation", "test"][i % 5]} for i, r in enumerate(rows)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    output = tmp_path / "run"
    code, _, err = finetune(capsys, files, output, "lora", task=path)
    assert code == 0, err
    run_info = json.loads((output / "run.json").read_text())
    assert run_info["label_names"] == ["0", "10", "20"]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 15, "validation": 5, "test": 4}


def test_training_that_diverges_leaves_no_finished_folder(capsys, files, tmp_path):
    output = tmp_path / "run"
    code, _, err = finetune(capsys, files, output, "full", "--lr", "1e30", "--head-lr", "1e30")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("spectral-peft: error: the training loss is")
    assert "Traceback" not in err
    assert not (output / "metrics.json").exists()


def test_s2ft_prior_optimizer_reaches_the_warm_up_and_is_recorded(capsys, files, tmp_path, monkeypatch):
    import spectral_peft.s2ft.prepare as prepare

    seen = []
    real = prepare.lora_prior
    monkeypatch.setattr(prepare, "lora_prior",
                        lambda model, config, *rest: seen.append(config) or real(model, config, *rest))
    for optimizer in (None, "adam"):
        output = tmp_path / f"s2ft-{optimizer}"
        extra = ("--s2ft-prior-optimizer", optimizer) if optimizer else ()
        code, _, err = finetune(capsys, files, output, "s2ft", *extra)
        assert code == 0, err
        run_info = json.loads((output / "run.json").read_text())
        assert run_info["settings"]["s2ft_prior_optimizer"] == (optimizer or "sgd")
    assert [(c.prior_optimizer, c.warm_up_lr) for c in seen] == [("sgd", 0.1), ("adam", 1e-3)]


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_unknown_method(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "out"
    argv = finetune_argv(bert, good_csv, out)
    argv[argv.index("lora")] = "dora"
    bad_input(capsys, argv, out, "unknown method 'dora'; choose one of loca, s2ft, fourierft")


def test_a_budget_larger_than_the_matrix(capsys, bert, good_csv, tmp_path):
    out = tmp_path / "out"
    argv = finetune_argv(bert, good_csv, out)
    argv[argv.index("lora")] = "loca"
    argv[argv.index("--n-frequency") + 1] = "5000"  # the tiny model's query is 32 x 32
    bad_input(capsys, argv, out, "n_frequency=5000 is larger than its 32 x 32")


def test_evaluate_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    bad_input(capsys, ["evaluate", "--adapter", tmp_path / "missing"], tmp_path / "missing", "adapter folder not found")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    code = main(["evaluate", "--adapter", str(tmp_path / "half")])
    assert code == 2 and "did not finish" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# before and after: the base model's metrics


def test_the_base_model_is_measured_before_training_and_shown_beside_the_result(capsys, files, tmp_path):
    output = tmp_path / "run"
    code, out, err = finetune(capsys, files, output, "lora")
    assert code == 0, err
    base = json.loads((output / "metrics.json").read_text())["base"]
    assert base["fresh_head"] is True
    assert set(base["validation"]) == set(base["test"]) == {"accuracy", "macro_f1", "loss", "examples"}
    assert base["test"]["examples"] == 12 and base["validation"]["examples"] == 6
    assert f"(base model (fresh head): accuracy {base['test']['accuracy']:.4f})" in out
    assert "base model (fresh head), test: accuracy" in err


def test_steps_0_gives_the_base_models_metrics(capsys, files, tmp_path):
    output = tmp_path / "run"
    code, out, err = finetune(capsys, files, output, "lora", "--steps", "0")
    assert code == 0, err
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["loss"] == [] and [v["step"] for v in metrics["validation"]] == [0]
    # LoRA starts as the base model (B = 0): nothing trained, nothing changed
    assert metrics["test"]["accuracy"] == metrics["base"]["test"]["accuracy"]
    assert metrics["test"]["loss"] == pytest.approx(metrics["base"]["test"]["loss"], rel=1e-6)


def test_a_language_models_base_perplexity_and_skip_base(capsys, files, tmp_path):
    output = tmp_path / "lm"
    code, out, err = finetune(capsys, files, output, "lora", task=files["txt"], model=files["gpt2"])
    assert code == 0, err
    base = json.loads((output / "metrics.json").read_text())["base"]
    assert base["fresh_head"] is False and base["test"]["perplexity"] > 1
    assert "(base model: perplexity " in out
    code, out, err = finetune(capsys, files, tmp_path / "skipped", "lora", "--skip-base")
    assert code == 0, err
    assert json.loads((tmp_path / "skipped" / "metrics.json").read_text())["base"] is None
    assert "base model" not in err + out


# ---------------------------------------------------------------------------------------------------------------
# interrupted runs


def _interrupt_at(monkeypatch, step: int):
    from spectral_peft.tools import training

    real = training.Training.step

    def step_or_interrupt(self, stream, at, grad_accum):
        if at == step:
            raise KeyboardInterrupt
        return real(self, stream, at, grad_accum)

    monkeypatch.setattr(training.Training, "step", step_or_interrupt)


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing(capsys, files, tmp_path, monkeypatch):
    output = tmp_path / "run"
    _interrupt_at(monkeypatch, 1)
    code, _, err = finetune(capsys, files, output, "lora", "--save-every", "3")
    assert code == 130 and not output.exists()
    told = [line for line in err.splitlines() if line.startswith("spectral-peft: interrupted")]
    assert len(told) == 1 and "rerun the same finetune command with --resume" in told[0]
    monkeypatch.undo()
    assert finetune(capsys, files, output, "lora")[0] == 0  # the same command starts again


def test_a_run_stopped_after_a_checkpoint_keeps_it(capsys, files, tmp_path, monkeypatch):
    output = tmp_path / "run"
    _interrupt_at(monkeypatch, 3)
    code, _, err = finetune(capsys, files, output, "lora", "--save-every", "2")
    assert code == 130 and (output / "checkpoint" / "state.pt").is_file() and (output / "run.json").is_file()
    monkeypatch.undo()
    code, _, err = finetune(capsys, files, output, "lora", "--save-every", "2", "--resume")
    assert code == 0, err
    assert json.loads((output / "metrics.json").read_text())["resumed_from_step"] == 2
