"""Metrics of a model on one split: accuracy, macro-F1 and loss (classification), perplexity and token loss
(language modelling)."""

from __future__ import annotations

import math
from typing import Optional

from .tasks import LANGUAGE_MODELING

# floats of logits one evaluation pass may hold: a language model's are rows x tokens x vocabulary (at 49,152 words,
# 128 tokens and 32 rows, 805 MB in float32), so its passes take fewer rows; classifiers' logits are small
LOGITS_BUDGET = 1 << 25


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


def rows_per_pass(model, encoded: dict, kind: str, batch_size: int) -> int:
    """Rows of one forward pass: ``batch_size``, fewer for a language model whose logits (rows x tokens x
    vocabulary floats) would pass :data:`LOGITS_BUDGET`."""
    if kind != LANGUAGE_MODELING:
        return batch_size
    vocabulary = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    per_row = encoded["input_ids"].shape[-1] * vocabulary
    return max(1, min(batch_size, LOGITS_BUDGET // per_row))


def evaluate_split(model, encoded: dict, kind: str, batch_size: int, desc: Optional[str] = None) -> dict:
    """Accuracy, macro-F1 and mean loss (classification of text or images), or perplexity and mean token loss
    (language modelling). ``desc``: the pass's name in the progress (None: no progress shown)."""
    import torch

    from .progress import Progress

    was_training = model.training
    model.eval()
    size = len(encoded["labels"])
    rows = rows_per_pass(model, encoded, kind, batch_size)
    predictions, labels = [], []
    loss_sum, tokens = 0.0, 0
    progress = Progress(math.ceil(size / rows), desc, unit="batch", leave=False) if desc else None
    with torch.no_grad():
        for start in range(0, size, rows):
            batch = {k: v[start:start + rows] for k, v in encoded.items()}
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            if kind != LANGUAGE_MODELING:
                loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
                predictions += logits.argmax(-1).tolist()
                labels += batch["labels"].tolist()
            else:
                row_loss, row_tokens = _token_loss(logits, batch)
                loss_sum, tokens = loss_sum + row_loss, tokens + row_tokens
            del logits
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    model.train(was_training)
    if kind != LANGUAGE_MODELING:
        correct = sum(int(p == y) for p, y in zip(predictions, labels))
        return {"accuracy": correct / size, "macro_f1": macro_f1(predictions, labels), "loss": loss_sum / size,
                "examples": size}
    mean = loss_sum / max(tokens, 1)
    return {"perplexity": math.exp(min(mean, 700.0)), "loss": mean, "tokens": tokens}


def _token_loss(logits, batch: dict) -> tuple[float, int]:
    """Summed next-token loss and the number of tokens counted (those the attention mask keeps), row by row:
    ``logits[i, :-1]`` is a view, so no copy of the logits is made (a copy of a large vocabulary's is hundreds of
    MB)."""
    import torch

    targets = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    total = 0.0
    for row in range(logits.shape[0]):
        total += torch.nn.functional.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=-100,
                                                   reduction="sum").item()
    return total, int((targets != -100).sum())


def base_label(fresh_head: bool) -> str:
    """The base model as tables and logs name it: a classifier's head before training is a fresh random one."""
    return "base model (fresh head)" if fresh_head else "base model"


def main_metric(kind: str) -> str:
    return "perplexity" if kind == LANGUAGE_MODELING else "accuracy"


def describe_metrics(what: str, result: dict) -> str:
    if "accuracy" in result:
        return f"{what}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f}"
    return f"{what}: perplexity {result['perplexity']:.3f}, loss {result['loss']:.4f}"
