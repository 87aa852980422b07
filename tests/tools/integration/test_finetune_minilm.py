"""`spectral-peft finetune` + `evaluate` on the real offline all-MiniLM-L6-v2 and BBC News, a few steps."""

from __future__ import annotations

import json

import pytest

from spectral_peft_cli import main

pytestmark = pytest.mark.integration


def test_loca_on_minilm_and_bbc_news(tmp_path, capsys):
    output = tmp_path / "loca"
    code = main(["finetune", "--method", "loca", "--n-frequency", "100", "--steps", "3", "--batch-size", "4",
                 "--max-length", "32", "--eval-every", "0", "--eval-examples", "16", "--eval-batch-size", "64",
                 "--threads", "1", "--quiet", "--output", str(output)])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((output / "metrics.json").read_text())
    run = json.loads((output / "run.json").read_text())
    assert run["task"] == "bbc-news" and run["model_arg"] is None and run["num_labels"] == 5
    assert metrics["examples"] == {"train": 1558, "validation": 223, "test": 444}
    # 100 coefficients on query and value of 6 layers (their 200 float locations counted apart), the 384 x 5 head
    assert metrics["adapter_params"] == 12 * 100 and metrics["location_params"] == 12 * 200
    assert metrics["head_params"] == 384 * 5 + 5
    assert metrics["base"]["fresh_head"] and metrics["base"]["test"]["examples"] == 444
    assert len(metrics["loss"]) == 3 and all(0 < x < 5 for x in metrics["loss"])
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["test"]["examples"] == 444

    code = main(["evaluate", "--adapter", str(output), "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert out.count(" yes") == 3
