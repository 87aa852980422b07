"""`spectral-peft analyze` on the real offline all-MiniLM-L6-v2 with a gradient prior from BBC News batches."""

from __future__ import annotations

import json

import pytest
import torch

from spectral_peft_cli import main

pytestmark = pytest.mark.integration


def test_analyze_a_changed_minilm(minilm_path, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    # a "tuned" copy saved as finetune --method full saves it: a rank-1 change of one query, noise on one value
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)
    generator = torch.Generator().manual_seed(0)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    value = model.bert.encoder.layer[2].attention.self.value.weight
    with torch.no_grad():
        query += 0.01 * torch.randn(384, 1, generator=generator) @ torch.randn(1, 384, generator=generator)
        value += 0.01 * torch.randn(384, 384, generator=generator)
    model.save_pretrained(tmp_path / "tuned")

    out = tmp_path / "analysis"
    code = main(["analyze", "--tuned", str(tmp_path / "tuned"), "--target-modules", "query,value",
                 "--prior-batches", "1", "--batch-size", "2", "--max-length", "16", "--threads", "1", "--quiet",
                 "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((out / "analysis.json").read_text())
    by_name = {r["name"]: r for r in result["matrices"]}
    assert set(by_name) == {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.2.attention.self.value"}
    assert result["settings"]["task"] == "bbc-news"
    rank_one = by_name["bert.encoder.layer.0.attention.self.query"]
    assert rank_one["errors"][0]["svd"] < 1e-3  # float32 weights: the difference is rank 1 up to rounding
    noise = by_name["bert.encoder.layer.2.attention.self.value"]
    # white noise: its spectrum is flat (chi-squared reference 0.28) and no ordering makes it sparse
    assert 0.25 < noise["flatness"]["dct"]["original"] < 0.31
    assert noise["energy"]["dct"]["self"][6] < 0.15
    assert (out / "analysis.md").is_file() and (out / "energy.png").is_file() and (out / "errors.png").is_file()
