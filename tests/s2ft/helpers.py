"""Tiny random models and batches for the S2FT tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 100
TARGETS = ("query", "value")
ADAPTED = tuple(f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in TARGETS)


def build_bert(seed: int = 0) -> BertForSequenceClassification:
    """A tiny random BERT classifier in eval mode, the same weights for the same seed."""
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        num_labels=3, max_position_embeddings=64,
    )
    return BertForSequenceClassification(config).eval()


def make_batches(n: int = 4, batch: int = 4, seq_len: int = 8, seed: int = 0, labels: bool = True) -> list[dict]:
    """Dicts {input_ids, attention_mask, labels}; the label is a function of the first token (a learnable task)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # some padding
        item = {"input_ids": ids, "attention_mask": mask}
        if labels:
            item["labels"] = ids[:, 0] % 3
        out.append(item)
    return out


def no_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def weight_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


def reference_gradients(model: torch.nn.Module, batches: list[dict], names=ADAPTED) -> list[dict[str, torch.Tensor]]:
    """The gradient of each batch's loss w.r.t. each named Linear weight, by plain autograd in eval mode."""
    model.eval()
    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        out.append({name: weight_of(model, name).grad.detach().clone() for name in names})
    model.zero_grad(set_to_none=True)
    return out


def flat(tensors: dict[str, torch.Tensor], names=ADAPTED) -> torch.Tensor:
    return torch.cat([tensors[name].flatten().float() for name in names])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def base_key(key: str) -> str:
    """The key a wrapped model's base weight had in the unwrapped model."""
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")
