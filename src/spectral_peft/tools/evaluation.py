"""Metrics of a model on one split: accuracy, macro-F1 and loss (classification), perplexity and token loss
(language modelling)."""

from __future__ import annotations

import math

from .tasks import CLASSIFICATION


def macro_f1(predictions: list[int], labels: list[int]) -> float:
    """Mean F1 over the classes present in the labels or the predictions (as scikit-learn's 'macro' average)."""
    classes = sorted(set(labels) | set(predictions))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


def evaluate_split(model, encoded: dict, kind: str, batch_size: int) -> dict:
    """Accuracy, macro-F1 and mean loss (classification), or perplexity and mean token loss (language modelling)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    size = len(encoded["labels"])
    predictions, labels = [], []
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, size, batch_size):
            batch = {k: v[start:start + batch_size] for k, v in encoded.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if kind == CLASSIFICATION:
                loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                predictions += logits.argmax(-1).tolist()
                labels += batch["labels"].tolist()
            else:
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = batch["labels"][:, 1:].reshape(-1)
                mask = batch["attention_mask"][:, 1:].reshape(-1).bool()
                loss_sum += F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum").item()
                tokens += int(mask.sum())
    model.train(was_training)
    if kind == CLASSIFICATION:
        correct = sum(int(p == y) for p, y in zip(predictions, labels))
        return {"accuracy": correct / size, "macro_f1": macro_f1(predictions, labels), "loss": loss_sum / size,
                "examples": size}
    mean = loss_sum / max(tokens, 1)
    return {"perplexity": math.exp(min(mean, 700.0)), "loss": mean, "tokens": tokens}


def main_metric(kind: str) -> str:
    return "accuracy" if kind == CLASSIFICATION else "perplexity"


def describe_metrics(what: str, result: dict) -> str:
    if "accuracy" in result:
        return f"{what}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}"
    return f"{what}: perplexity {result['perplexity']:.3f}, loss {result['loss']:.4f}"
