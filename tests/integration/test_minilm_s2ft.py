"""S2FT on the real (offline) all-MiniLM-L6-v2 with real BBC News articles: prepare_s2ft, then a few steps."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

MAX_TOKENS = 32
STEPS = 8


@pytest.mark.parametrize("prior", ["gradient", "lora"])
def test_prepare_s2ft_then_training_lowers_the_loss(minilm_path, prior):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from spectral_peft import S2FTConfig, prepare_s2ft
    from spectral_peft.tools.data import batches, load_bbc_news, tokenize_classification
    from spectral_peft.s2ft import S2FTLinear

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    train = load_bbc_news(seed=0)["train"][:64]
    encoded = tokenize_classification(tokenizer, train, MAX_TOKENS)
    stream = list(batches(encoded, batch_size=16, seed=0))
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)
    query_before = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()

    config = S2FTConfig(
        target_modules=["query", "value"], n_frequency=1000, modules_to_save=["classifier"], task_type="SEQ_CLS",
        prior=prior, prior_batches=2, prior_steps=4, scaling=1.0,
    )
    model = prepare_s2ft(base, config, stream)
    layers = [m for m in model.modules() if isinstance(m, S2FTLinear)]
    assert len(layers) == 12
    assert torch.equal(layers[0].get_base_layer().weight, query_before)
    for layer in layers:
        # real orderings (not the identity) and locations that are the prior's, distinct
        assert not torch.equal(layer.s2ft_row_order["default"], torch.arange(384))
        cells = layer.s2ft_locations["default"]
        assert torch.unique(cells[0] * 384 + cells[1]).numel() == 1000

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    fixed = stream[0]
    losses = []
    for _ in range(STEPS):
        loss = model(**fixed).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert any(layer.s2ft_coefficients["default"].abs().sum() > 0 for layer in layers)
