"""The metrics of a split."""

from __future__ import annotations

import pytest

from spectral_peft.tools.evaluation import macro_f1


def test_macro_f1_matches_the_definition():
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 0 fp 0 fn 1 -> 0
    assert macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)
    scipy_free = macro_f1([0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1])
    # class 0: 1.0; class 1: tp1 fp1 fn1 -> 0.5; class 2: tp2 fp1 fn1 -> 2/3
    assert scipy_free == pytest.approx((1 + 0.5 + 2 / 3) / 3)


def _lm_split(rows: int = 5, tokens: int = 8, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (rows, tokens), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row: its last tokens do not count
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def test_language_model_loss_is_the_masked_next_token_cross_entropy(tiny_gpt2):
    """Row by row without copying the logits, the perplexity is the one of all logits at once."""
    import math

    import torch
    import torch.nn.functional as F

    from spectral_peft.tools.evaluation import evaluate_split
    from spectral_peft.tools.tasks import LANGUAGE_MODELING

    split = _lm_split()
    with torch.no_grad():
        logits = tiny_gpt2(input_ids=split["input_ids"], attention_mask=split["attention_mask"]).logits
    keep = split["attention_mask"][:, 1:].reshape(-1).bool()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1])[keep],
                               split["labels"][:, 1:].reshape(-1)[keep])
    result = evaluate_split(tiny_gpt2, split, LANGUAGE_MODELING, batch_size=2)
    assert result["tokens"] == 5 * 7 - 3
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-6)


def test_a_large_vocabulary_is_evaluated_a_few_rows_at_a_time(tiny_gpt2, monkeypatch):
    """A pass holds at most LOGITS_BUDGET floats of logits (rows x tokens x vocabulary): 100 words x 8 tokens per
    row and a budget of 1,700 floats make 2 rows a pass, whatever the evaluation batch size; classifiers keep it."""
    from spectral_peft.tools import evaluation
    from spectral_peft.tools.tasks import CLASSIFICATION, LANGUAGE_MODELING

    split = _lm_split()
    reference = evaluation.evaluate_split(tiny_gpt2, split, LANGUAGE_MODELING, batch_size=32)  # one pass
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET", 1700)
    seen = []
    forward = tiny_gpt2.forward
    monkeypatch.setattr(tiny_gpt2, "forward", lambda **inputs: seen.append(len(inputs["input_ids"])) or
                        forward(**inputs))
    result = evaluation.evaluate_split(tiny_gpt2, split, LANGUAGE_MODELING, batch_size=32)
    assert seen == [2, 2, 1] and result["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert evaluation.rows_per_pass(tiny_gpt2, split, CLASSIFICATION, 32) == 32
